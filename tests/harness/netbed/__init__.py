"""A network test bed: a coordinator and N workers whose every connection crosses a link of
a chosen bandwidth and round-trip time (the "training across slow links" issue).

Topology of a shaped profile (root only; ``lan`` is plain loopback and adds nothing)::

      ns c (coordinator)     ns w0 (worker 0)        ns w1 (worker 1)    ...
      proxy 10.77.0.10:8000  proxy 10.77.0.11:50051  proxy 10.77.0.12:50051
        -> uvicorn 127.0.0.1   -> gRPC 127.0.0.1       -> gRPC 127.0.0.1
         eth0 [tbf up]          eth0 [tbf up]           eth0 [tbf up]
           |                      |                       |
         p0 [tbf down]          p1 [tbf down]           p2 [tbf down]
      '-------------------- ns hub: bridge br0 ----------------------'

* Bandwidth: every host's veth "access link" is shaped by tbf at the profile's rate on the
  egress of both ends, so each host's upload and download are limited; a worker-to-worker
  byte crosses the sender's uplink and the receiver's downlink, both at that rate.
* Delay: the kernel has no netem, so a user-space proxy (asyncio, whole chunks, a timestamped
  queue per direction) in front of every server holds each byte RTT/2 each way. It lives in
  the server's namespace and the server binds only that namespace's loopback: every
  connection goes through exactly one proxy, pays the RTT once per round trip, and crosses the
  shaped link once. Workers register the proxy's address (``--advertise``).
* Self-check before every run (``selfcheck``): RTT by TCP echo and throughput by a 16 MB
  upload across the link, refused when more than 20% off the profile; the proxies' CPU time is
  reported, since they share the machine's cores with the training.

Modules: ``profiles`` (what a link should be), ``namespaces`` (veth, bridge, tbf, leftovers),
``proxy`` (the delay), ``selfcheck`` (measuring and judging), ``linkcheck`` (the bed's side
of the self-check: ``measure``, ``check``), ``bed`` (``NetBed``: start, check, run, tear
down), ``islands`` (``IslandBed``: sites of several workers each, lan inside
a site, the profile between sites; the proxy lets a site's own connections through
undelayed), ``steps`` (per-step times from rank 0's log). Import from the
modules (``from harness.netbed.bed import NetBed``): this file imports nothing, so the proxy
and self-check processes (``python -m harness.netbed.proxy``) start without the launcher.
"""
