"""A small real-text classification set: English prose (1) versus Python code (0).

From Python sources (the stdlib corpus, a .py file or a directory of them) each comment and
docstring line of a few words is a prose example, stripped of '#' and quotes so the marker
gives nothing away, and each plain code line is a code example. Examples are de-duplicated,
balanced and interleaved; the tail is held out. A .jsonl source instead gives its own text and
integer label fields. Every example is padded or truncated to ``seq_len`` tokens.
"""

from __future__ import annotations

import io
import logging
import math
import time
import tokenize
from collections.abc import Iterator
from pathlib import Path

import torch

from worker.data.batching import Batch, RowDataset, RowSchedule
from worker.data.config import DataConfig
from worker.data.corpus import STDLIB, directory_files, iter_jsonl, read_text, stdlib_files
from worker.data.tokenizer import Tokenizer

log = logging.getLogger(__name__)

PROSE, CODE = 1, 0
MIN_WORDS = 4
MIN_CODE_CHARS = 20


def _prose(text: str) -> str | None:
    """A comment or docstring line worth keeping as English, or None."""
    text = " ".join(text.strip().strip("#\"'").split())
    if text.startswith((">>>", "...", "!", "-*-")) or len(text.split()) < MIN_WORDS:
        return None
    return text if sum(c.isalpha() for c in text) > len(text) // 2 else None


def _is_docstring(tok: tokenize.TokenInfo, prev: int) -> bool:
    """A string token that is a whole statement (a docstring, by position)."""
    return (tok.type == tokenize.STRING and prev in (tokenize.NEWLINE, tokenize.INDENT,
                                                     tokenize.DEDENT, tokenize.ENCODING)
            and tok.string.lstrip("rRbBuU").startswith(('"""', "'''")))


def split_source(source: str) -> tuple[list[str], list[str]]:
    """(prose lines, code lines) of one Python source; ([], []) if it does not tokenise."""
    prose: list[str] = []
    skip: set[int] = set()
    prev = tokenize.ENCODING
    try:
        for tok in tokenize.generate_tokens(io.StringIO(source).readline):
            if tok.type == tokenize.COMMENT:
                prose.append(tok.string)
                skip.add(tok.start[0])
            elif tok.type == tokenize.STRING or tok.type == getattr(tokenize, "FSTRING_START", -1):
                if _is_docstring(tok, prev):
                    prose.extend(tok.string.splitlines())
                skip.update(range(tok.start[0], tok.end[0] + 1))
            if tok.type not in (tokenize.NL, tokenize.COMMENT):
                prev = tok.type
    except (tokenize.TokenError, SyntaxError, IndentationError):
        return [], []
    kept = [p for p in (_prose(t) for t in prose) if p]
    code = [line.strip() for n, line in enumerate(source.splitlines(), start=1)
            if n not in skip and len(line.strip()) >= MIN_CODE_CHARS]
    return kept, code


def python_sources(source: str) -> Iterator[str]:
    """The Python files of a classification source, in sorted order."""
    if source == STDLIB:
        files = stdlib_files()
    else:
        path = Path(source)
        if path.is_dir():
            files = [p for p in directory_files(path) if p.suffix == ".py"]
        elif path.is_file() and path.suffix == ".py":
            files = [path]
        else:
            raise ValueError(f"classification source {source!r} must be 'stdlib', a .jsonl file "
                             "with text and label fields, a .py file or a directory of them")
        if not files:
            raise FileNotFoundError(f"no .py files under {source}")
    for file in files:
        yield read_text(file)


def prose_vs_code(source: str, max_examples: int | None) -> list[tuple[str, int]]:
    """Balanced, de-duplicated (text, label) pairs, prose and code interleaved."""
    want = None if max_examples is None else (max_examples + 1) // 2
    seen: set[str] = set()
    found: dict[int, list[str]] = {PROSE: [], CODE: []}
    for text in python_sources(source):
        for label, lines in zip((PROSE, CODE), split_source(text)):
            for line in lines:
                if line not in seen:
                    seen.add(line)
                    found[label].append(line)
        if want is not None and min(len(v) for v in found.values()) >= want:
            break
    n = min(len(found[PROSE]), len(found[CODE]), want if want is not None else 1 << 62)
    pairs = [(found[label][i], label) for i in range(n) for label in (PROSE, CODE)]
    return pairs[:max_examples] if max_examples is not None else pairs


def labelled_jsonl(path: Path, text_field: str, label_field: str,
                   max_examples: int | None) -> list[tuple[str, int]]:
    """(text, label) pairs of a .jsonl file; labels must be non-negative integers."""
    pairs = []
    for i, obj in enumerate(iter_jsonl(path, text_field)):
        label = obj.get(label_field)
        if not isinstance(label, int) or isinstance(label, bool) or label < 0:
            raise ValueError(f"{path}: example {i} has {label_field}={label!r}, expected an "
                             "integer >= 0")
        pairs.append((str(obj[text_field]), label))
        if max_examples is not None and len(pairs) >= max_examples:
            break
    return pairs


class ClassificationData(RowDataset):
    """Padded token rows with one integer label each; same batch API as ``PackedText``."""

    def __init__(self, config: DataConfig, tokenizer: Tokenizer) -> None:
        t0 = time.perf_counter()
        self.config = config
        self.tokenizer = tokenizer
        if config.source.endswith(".jsonl"):
            pairs = labelled_jsonl(Path(config.source), config.text_field, config.label_field,
                                   config.max_examples)
        else:
            pairs = prose_vs_code(config.source, config.max_examples)
        n_eval = math.ceil(len(pairs) * config.eval_fraction)
        if len(pairs) - n_eval < 1:
            raise ValueError(f"classification source {config.source!r} gives {len(pairs)} "
                             f"examples; {n_eval} held out leaves none to train on")
        ids, mask = self._encode([t for t, _ in pairs])
        labels = torch.tensor([y for _, y in pairs], dtype=torch.long)
        self.num_labels = int(labels.max()) + 1
        cut = len(pairs) - n_eval
        self.texts = [t for t, _ in pairs]
        self._train = (ids[:cut], mask[:cut], labels[:cut])
        self._eval = (ids[cut:], mask[cut:], labels[cut:])
        self.num_train_rows, self.num_eval_rows = cut, n_eval
        self.schedule = RowSchedule(cut, config.seed)
        log.info("%s: %d train + %d eval examples, %d labels, padded to %d (%.2fs)",
                 config.source, cut, n_eval, self.num_labels, config.seq_len,
                 time.perf_counter() - t0)

    def _encode(self, texts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """Token ids and attention mask, [len(texts), seq_len], padded on the right."""
        length = self.config.seq_len
        ids = torch.full((len(texts), length), self.tokenizer.pad_token_id, dtype=torch.long)
        mask = torch.zeros((len(texts), length), dtype=torch.long)
        for i, text in enumerate(texts):
            row = self.tokenizer.encode_example(text, max_length=length)[:length]
            ids[i, : len(row)] = torch.tensor(row, dtype=torch.long)
            mask[i, : len(row)] = 1
        return ids, mask

    @staticmethod
    def _as_batch(ids: torch.Tensor, mask: torch.Tensor, labels: torch.Tensor) -> Batch:
        return {"input_ids": ids.clone(), "attention_mask": mask.clone(), "labels": labels.clone()}

    def _train_rows(self, index: torch.Tensor) -> Batch:
        return self._as_batch(*(t[index] for t in self._train))

    def _eval_rows(self, start: int, stop: int) -> Batch:
        return self._as_batch(*(t[start:stop] for t in self._eval))

    def global_batch(self, *, step: int, micro_batch: int, grad_accum: int,
                     micro_batch_rows: int) -> Batch:
        """Every tensor of one global micro-batch, for any world size (labels: [rows])."""
        return self.global_dict(step=step, micro_batch=micro_batch, grad_accum=grad_accum,
                                micro_batch_rows=micro_batch_rows)
