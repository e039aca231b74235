"""``IslandBed``: sites of several workers each, a lan inside a site, a profiled link between.

    with IslandBed(PROFILES["wan-100m"], sites=[2, 2], worker_args=[...],
                   site_args={1: ["--data", "other.txt"]}) as bed:
        workers = bed.run(timeout=600)    # launcher Child objects, w0..w3, with their lines

The two-level picture of DESIGN.md (ZeRO-3 inside a site, DiLoCo across sites) on one machine::

      ns c (coordinator)        ns s0 (site 0: w0, w1)              ns s1 (site 1: w2, w3)
      proxy 10.77.0.10:8000     proxy 10.77.0.11:50051+j, 51051+j   proxy 10.77.0.12:...
        -> uvicorn 127.0.0.1      -> inner gRPC 127.0.0.1:60051+j     (the same)
                                  -> outer gRPC 127.0.0.1:61051+j
         eth0 [tbf]                eth0 [tbf]: the site's one WAN link, shared by its workers
      '------------------------- ns hub: bridge br0 -----------------------------'

* A site is one namespace holding all its workers (roles ``c``, ``s0``, ``s1``, ...). Worker
  ``j`` of a site serves its inner (ZeRO-3) gRPC server on public port 50051+j and its outer
  (DiLoCo) one on 51051+j, both on the site's proxy, each bound to the namespace's loopback
  at public + ``INNER``.
* Inside a site the link is lan: a worker dialing a peer of its own site reaches the site's
  proxy from the site's own address, and the proxy (``--local-bypass``) forwards such
  connections with no delay; they never leave the namespace, so tbf never sees them. Across
  sites, and to the coordinator, every byte crosses two tbf hops and one delaying proxy, as in
  ``NetBed``.
* ``flat=True`` is the baseline: the same placement and links, but no ``--site`` and no outer
  server, so all workers form one ZeRO-3 group whose collectives cross the WAN.
* ``lan``: no namespaces, every server on loopback (no root needed), sites only as flags.

Worker ``j`` of site ``k`` gets its inner server's flags (``--port``, ``--advertise``), its
outer server's (``--outer-port``, ``--outer-advertise``), ``--site sK --sites s0,s1,...``
(every island, in data order), then ``worker_args``, then ``site_args[k]``. Each site's
barrier waits for the site's own workers (``--min-workers`` = its size; the whole world when
flat); a later ``--min-workers`` in the args wins. The outer round's knobs (``--outer-every``,
``--outer-lr``, ...) are the caller's.
The self-check measures site 1 dialing site 0 (one cross-site link) and ``run`` refuses a link
more than 20% off; teardown is ``NetBed``'s on every path.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence

from harness.netbed.bed import CHECK_PORT, GRPC_PORT, HTTP_PORT, NetBed
from harness.netbed.profiles import Profile
from worker.cluster.launcher import worker_argv

log = logging.getLogger(__name__)

OUTER_PORT = 51051  # worker j's outer server: public 51051+j (inner: GRPC_PORT + j)
MAX_SITE_WORKERS = OUTER_PORT - GRPC_PORT  # the inner ports must stay below the outer ones


class IslandBed(NetBed):
    """Sites of workers behind shared profiled links; see the module docstring."""

    local_bypass = True  # a site's own workers reach its proxy as a lan

    def __init__(self, profile: Profile, *, sites: Sequence[int] = (2, 2),
                 worker_args: Sequence[str] = (),
                 site_args: Mapping[int, Sequence[str]] | None = None, flat: bool = False,
                 **kwargs) -> None:
        sizes = list(sites)
        if not sizes or any(not 1 <= n <= MAX_SITE_WORKERS for n in sizes):
            raise ValueError(f"sites {sizes}: need at least one site, each of 1.."
                             f"{MAX_SITE_WORKERS} workers")
        extra = {k: list(v) for k, v in (site_args or {}).items()}
        if unknown := sorted(set(extra) - set(range(len(sizes)))):
            raise ValueError(f"site_args for sites {unknown}, but there are sites "
                             f"0..{len(sizes) - 1} only")
        super().__init__(profile, world_size=sum(sizes), worker_args=worker_args, **kwargs)
        self.sites = sizes
        self.site_args = extra
        self.flat = flat
        # worker i -> (its site, its index inside the site), sites filled in order
        self.placement = [(k, j) for k, n in enumerate(sizes) for j in range(n)]

    @property
    def site_names(self) -> list[str]:
        """``s0``, ``s1``, ...: each site's name, also its namespace's role."""
        return [f"s{k}" for k in range(len(self.sites))]

    def site_of(self, i: int) -> str:
        """Worker ``i``'s site name."""
        return self.site_names[self.placement[i][0]]

    # --- NetBed's placement hooks ------------------------------------------------------------

    def _roles(self) -> list[str]:
        return ["c", *self.site_names]

    def _proxied_ports(self) -> dict[str, list[int]]:
        ports = {"c": [HTTP_PORT]}
        for k, n in enumerate(self.sites):
            ports[f"s{k}"] = [*(GRPC_PORT + j for j in range(n)),
                              *(() if self.flat else (OUTER_PORT + j for j in range(n)))]
        ports[self._check_roles()[0]].append(CHECK_PORT)
        return ports

    def _check_roles(self) -> tuple[str, str]:
        """Site 1 dials site 0 (one cross-site link); a single site is dialed from ``c``."""
        return "s0", "s1" if len(self.sites) > 1 else "c"

    def _worker_argv(self, i: int) -> list[str]:
        k, j = self.placement[i]
        host = self._host(f"s{k}")
        servers = [("--port", "--advertise", GRPC_PORT + j)]
        site: list[str] = []
        if not self.flat:
            servers.append(("--outer-port", "--outer-advertise", OUTER_PORT + j))
            site = ["--site", f"s{k}", "--sites", ",".join(self.site_names)]
        extra = [*self._net_args(host, servers), *site, *self.worker_args,
                 *self.site_args.get(k, ())]
        return worker_argv(self._url, worker_id=f"w{i}",
                           min_workers=self.world_size if self.flat else self.sites[k],
                           extra=extra, entry=self._entry(host))
