"""The wire contract: what the client and the agent agree on, and all that both sides import.

- :mod:`.protocol`: one JSON line per request and per answer, the version handshake, the time limits;
- :mod:`.errors`: the typed errors (rooted at ``LabkitError``) and how they cross the wire;
- :mod:`.specs`: the frozen, validated descriptions of what to make (a rootfs, a process, a cgroup, a
  network, an image reference), sent by the client and decoded once by the agent;
- :mod:`.arch`: the per-architecture tables (capability names, system call numbers);
- :mod:`.channel`: a ``Channel``: one call out, one answer back, with its time limit.

Standard library only: the agent runs on a target's bare ``python3``.
"""
