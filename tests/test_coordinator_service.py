"""The service's rules at the coordinator, over real uvicorn and SQLite, with no workers: the
test plays the serving worker through the same HTTP routes (GET /service/next, POST result).

Numbering, idempotent retries, validation against the built model, cancellation, the one
result that wins, persistence across a restart on the same file, and the resume point."""

from __future__ import annotations

import json
import math
import threading
import time

import pytest
from coordinator_helpers import TOKEN, client, register, serve

from coordinator.config import Settings
from zerop2p import ServiceClient, ServiceError, types

pytestmark = pytest.mark.timeout(60)
MODEL = {"vocab_size": 257, "max_positions": 32, "trainable_params": 10, "total_params": 100,
         "lora": False}


def datum(tokens, weights=None, targets=None) -> dict:
    n = len(tokens)
    return {"model_input": {"chunks": [{"tokens": tokens}]},
            "loss_fn_inputs": {"target_tokens": targets or [1] * n,
                               "weights": weights or [1.0] * n}}


def serving(http) -> int:
    """The pretend serving worker ``w``'s active generation (registered and formed once: a
    member re-registering would end it)."""
    gen = http.get("/training/generation").json()["generation"]
    if gen is None:
        register(http, "w")
        gen = http.get("/training/ready", params={"min_workers": 1}).json()["generation"]
    return gen


def post_result(http, op_id, result=None, *, worker="w", error=None):
    return http.post(f"/service/ops/{op_id}/result",
                     json={"worker_id": worker, "generation": serving(http), "result": result,
                           "error": error})


def create(http, sid="s1") -> int:
    """A session whose creation a pretend worker finishes; returns the create op's id."""
    http.post("/service/sessions", json={"session_id": sid, "base_model": "tiny-gpt2"})
    after = http.get("/service/resume").json()["after"]
    op = http.get("/service/next", params={"after": after}).json()["operation"]
    assert (op["session_id"], op["seq"], op["kind"], op["status"]) == (sid, 0, "create", "running")
    done = post_result(http, op["id"], {"model": MODEL})
    assert done.json()["status"] == "done"
    return op["id"]


def submit(http, seq, kind="forward_backward", body=None, sid="s1"):
    body = body if body is not None else {"data": [datum([1, 2, 3])]}
    return http.post(f"/service/sessions/{sid}/ops", json={"seq": seq, "kind": kind, "body": body})


def test_ops_are_numbered_retries_are_idempotent_and_a_reused_seq_is_refused(tmp_path):
    with serve(Settings(db=str(tmp_path / "c.db"), token=TOKEN)) as (url, _), client(url) as http:
        create(http)
        first = submit(http, 1)
        assert first.status_code == 200 and first.json()["status"] == "queued"
        again = submit(http, 1)  # a retried POST: the same record, nothing queued twice
        assert again.json()["id"] == first.json()["id"]
        other = submit(http, 1, body={"data": [datum([4, 5])]})
        assert other.status_code == 409 and "already holds another operation" in other.text
        gap = submit(http, 3)
        assert gap.status_code == 409 and "expected 2" in gap.text
        assert submit(http, 2, "optim_step", {"adam_params": {}}).status_code == 200
        kinds = [op["kind"] for op in (http.get("/service/next", params={"after": a}).json()
                                       ["operation"] for a in (1, 2))]
        assert kinds == ["forward_backward", "optim_step"]


@pytest.mark.parametrize("datum_args, message", [
    (([1, 2, 300],), "data[0].model_input: token 300 at index 2 is outside the vocabulary"),
    (([1, 2, 3], None, [1, -1, 2]), "target_tokens: token -1 at index 1"),
    (([1] * 40,), "40 tokens exceed the model's 32 positions"),
    (([1, 2, 3], [1.0, math.nan, 1.0]), "weights[1] is nan"),
    (([1, 2, 3], [1.0, 1.0]), "has 2 values for 3 input tokens"),
])
def test_bad_bodies_get_422_naming_the_datum_and_index(tmp_path, datum_args, message):
    with serve(Settings(db=str(tmp_path / "c.db"), token=TOKEN)) as (url, _), client(url) as http:
        create(http)
        good = datum([1, 2, 3])
        body = {"data": [good, datum(*datum_args)]} if "data[0]" not in message else \
            {"data": [datum(*datum_args)]}
        raw = json.dumps({"seq": 1, "kind": "forward_backward", "body": body})
        answer = http.post("/service/sessions/s1/ops", content=raw,
                           headers={"content-type": "application/json"})
        assert answer.status_code == 422, answer.text
        assert message in answer.json()["detail"]
        assert submit(http, 1).status_code == 200  # nothing was queued: seq 1 is still free


def test_model_bound_bodies_wait_for_the_build_and_cancel_only_queued(tmp_path):
    with serve(Settings(db=str(tmp_path / "c.db"), token=TOKEN)) as (url, _), client(url) as http:
        http.post("/service/sessions", json={"session_id": "s1", "base_model": "tiny-gpt2"})
        early = submit(http, 1)
        assert early.status_code == 409 and "not built yet" in early.text
        op0 = http.get("/service/next", params={"after": 0}).json()["operation"]
        post_result(http, op0["id"], {"model": MODEL})
        submit(http, 1)
        submit(http, 2, "optim_step", {"adam_params": {}})
        taken = http.get("/service/next", params={"after": op0["id"]}).json()["operation"]
        refused = http.delete("/service/sessions/s1/ops/1")
        assert refused.status_code == 409 and "running" in refused.text
        cancelled = http.delete("/service/sessions/s1/ops/2")
        assert cancelled.json()["status"] == "cancelled"
        assert http.get("/service/next", params={"after": taken["id"]}).json()["operation"] is None


def test_the_first_result_wins_and_a_long_poll_wakes_on_it(tmp_path):
    with serve(Settings(db=str(tmp_path / "c.db"), token=TOKEN)) as (url, _), client(url) as http:
        create(http)
        submit(http, 1)
        op = http.get("/service/next", params={"after": 1}).json()["operation"]
        answers = {}
        waiter = threading.Thread(target=lambda: answers.update(http.get(
            "/service/sessions/s1/ops/1", params={"wait": 20}).json()))
        waiter.start()
        time.sleep(0.3)
        assert not answers  # the long-poll holds the request while the op runs
        outsider = post_result(http, op["id"], {"metrics": {"loss:sum": 7.0}}, worker="ghost")
        assert outsider.status_code == 409 and "not a member" in outsider.text
        result = {"loss_fn_outputs": [], "metrics": {"loss:sum": 1.5}}
        post_result(http, op["id"], result)
        late = {"loss_fn_outputs": [], "metrics": {"loss:sum": 9.0}}
        post_result(http, op["id"], late)  # a replay's second answer changes nothing
        waiter.join(10)
        assert answers["status"] == "done" and answers["result"]["metrics"]["loss:sum"] == 1.5
        stored = http.get("/service/sessions/s1/ops/1").json()
        assert stored["result"]["metrics"]["loss:sum"] == 1.5


def test_queued_and_finished_operations_survive_a_restart_and_resume_from_the_base(tmp_path):
    db = str(tmp_path / "c.db")
    with serve(Settings(db=db, token=TOKEN)) as (url, _), client(url) as http:
        create_id = create(http)
        for seq in (1, 2, 3):
            submit(http, seq, "optim_step", {"adam_params": {"learning_rate": seq * 1e-3}})
        first = http.get("/service/next", params={"after": create_id}).json()["operation"]
        post_result(http, first["id"], {"step": 1})
        assert http.get("/service/resume").json()["after"] == 0  # no base: from the start
        http.post("/service/sessions/s1/base", json={"worker_id": "w", "generation": serving(http),
                                                     "seq": 1, "path": "/p"})
    with serve(Settings(db=db, token=TOKEN)) as (url, _), client(url) as http:
        statuses = [http.get(f"/service/sessions/s1/ops/{s}").json()["status"] for s in range(4)]
        assert statuses == ["done", "done", "queued", "queued"]
        session = http.get("/service/sessions/s1").json()
        assert (session["base_seq"], session["base_path"], session["last_seq"]) == (1, "/p", 3)
        assert http.get("/service/resume").json()["after"] == first["id"]
        assert submit(http, 4, "optim_step", {"adam_params": {}}).status_code == 200


def test_the_client_numbers_calls_and_reports_a_refusal_by_name(tmp_path):
    with serve(Settings(db=str(tmp_path / "c.db"), token=TOKEN)) as (url, _), client(url) as http:
        service = ServiceClient(url, token=TOKEN, retry_for=5)
        done = threading.Thread(target=lambda: create(http, "c1"))
        done.start()
        training = service.create_full_training_client("tiny-gpt2", session_id="c1", timeout=20)
        done.join()
        assert training.model.vocab_size == 257
        good = types.Datum(model_input=types.ModelInput.from_ints([1, 2]),
                           loss_fn_inputs={"target_tokens": [2, 3], "weights": [0.5, 0.5]})
        futures = [training.forward_backward([good]), training.optim_step(types.AdamParams())]
        assert [f.seq for f in futures] == [1, 2]
        bad = good.model_copy(update={"model_input": types.ModelInput.from_ints([1, 999])})
        with pytest.raises(ServiceError, match="token 999 at index 1 is outside"):
            training.forward_backward([bad])
        assert training.forward_backward([good]).seq == 3  # the refused call took no number
        with pytest.raises(TimeoutError):
            futures[0].result(timeout=0.5)
        assert futures[1].cancel() and training.optim_step(types.AdamParams()).seq == 4
        service.close()


@pytest.mark.parametrize("kind, body, message", [
    ("optim_step", {"adam_params": {"learning_rate": math.inf}}, "adam_params.learning_rate"),
    ("sample", {"prompt": {"chunks": [{"tokens": [1]}]},
                "sampling_params": {"top_p": 0.9}}, "only untruncated sampling"),
    ("sample", {"prompt": {"chunks": [{"tokens": [1]}]}, "num_samples": 256,
                "sampling_params": {"max_tokens": 4096}}, "exceeds 262144"),
    ("compute_logprobs", {"prompt": {"chunks": [{"tokens": []}]}}, "prompt: it has no tokens"),
    ("forward", {"data": [datum([1, 2], None, [1.5, 2])]}, "target_tokens[0] is 1.5"),
])
def test_more_bad_bodies_are_refused_by_name(tmp_path, kind, body, message):
    with serve(Settings(db=str(tmp_path / "c.db"), token=TOKEN)) as (url, _), client(url) as http:
        create(http)
        raw = json.dumps({"seq": 1, "kind": kind, "body": body}).replace("Infinity", "1e999")
        answer = http.post("/service/sessions/s1/ops", content=raw,
                           headers={"content-type": "application/json"})
        assert answer.status_code == 422, answer.text
        assert message in answer.json()["detail"]


def test_the_noise_salt_reaches_workers_only(tmp_path):
    with serve(Settings(db=str(tmp_path / "c.db"), token=TOKEN)) as (url, _), client(url) as http:
        http.post("/service/sessions", json={"session_id": "s1", "base_model": "tiny-gpt2"})
        taken = http.get("/service/next", params={"after": 0}).json()
        assert len(taken["noise_salt"]) == 32
        assert "noise_salt" not in json.dumps(http.get("/service/sessions/s1").json())
