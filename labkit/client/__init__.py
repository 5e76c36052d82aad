"""The client core: connect to a target and drive it (standard library only, charts load lazily).

- :mod:`.lab`: ``connect`` and the ``Lab`` facade (one method, one request);
- :mod:`.handles`: the live handles a ``Lab`` hands out (``Rootfs``, ``Process``, ``Cgroup``, ``Container``,
  ...), each undoing only what it made;
- :mod:`.transport`: how requests reach the agent (a subprocess under sudo, SSH; the in-process channel
  is the agent's own, :mod:`labkit.agent.local`);
- :mod:`.records`: what the agent did, shown in a notebook; :mod:`.vagrant`: the lab VM as a target;
- :mod:`.probe`: reading the isolation probe's facts and comparing them with the host's.

Imports only :mod:`labkit.wire` from outside itself: never the agent, never the course.
"""
