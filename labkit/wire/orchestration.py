"""Orchestration (lab 09): a small Docker Swarm's desired state and its control loop. Pure: no I/O, no clock.

This module owns the desired state (:class:`ServiceSpec`, :class:`StackSpec`, and Compose stack files read by
:meth:`StackSpec.from_compose`), the cluster as a manager records it (:class:`Node`, :class:`Task`), the
scheduler (:func:`schedule`, Swarm's spread strategy) and the reconcile step of the control loop
(:func:`reconcile`, which returns the :class:`Action` s that bring the tasks towards the desired state; the
caller carries them out and stores every action's task). Time is passed in (``now``, the caller's seconds),
so every step is deterministic. Specs are validated where they are made and again by ``from_dict`` on the
agent's side, as in :mod:`labkit.wire.specs`. Standard library only: the privileged agent imports it too.
"""
from __future__ import annotations  # the fields' types stay text (Python 3.9 parses X | None as a string)

import dataclasses
import math
import re
import shlex
from dataclasses import dataclass

from .errors import InvalidSpec
from .specs import ImageRef, Spec, argv_tuple, check_name, check_port, env_pairs, whole_number

ROLES = ("manager", "worker")
AVAILABILITIES = ("active", "pause", "drain")
NODE_STATUSES = ("ready", "down")
TASK_STATES = ("new", "assigned", "starting", "running", "complete", "failed", "shutdown", "rejected", "orphaned")
#: a task in one of these states, with desired state running, holds its slot
LIVE_STATES = ("new", "assigned", "starting", "running")
#: a task that ended by itself: its slot gets a new task (restart policy "any")
ENDED_STATES = ("complete", "failed", "rejected")
FAILED_STATES = ("failed", "rejected")
FAILURE_ACTIONS = ("rollback", "pause", "continue")
ACTION_KINDS = ("start", "stop", "mark")

MAX_REPLICAS = 100
#: the longest service name: <service>.<slot>.<10 hex digits> is a container name of at most 63 characters
MAX_SERVICE_NAME = 63 - len(".100.") - 10
MAX_SERVICES = 32
#: the longest string a spec takes (an argument, an environment value, a reason)
MAX_TEXT = 4096
#: the most items in one list of a spec (arguments, environment variables, ports, networks)
MAX_ITEMS = 256
MAX_SECONDS = 3600.0
#: the longest a health check may run (the manager's step waits for the checks due)
MAX_HEALTH_TIMEOUT = 60.0
#: a slot whose last BACKOFF_TASKS tasks all failed less than BACKOFF_WINDOW seconds ago gets no new task yet
BACKOFF_TASKS = 5
BACKOFF_WINDOW = 10.0
#: how long after a new task fails, or an old one stops, :func:`update_failed` still counts it (at least)
UPDATE_MONITOR = 10.0

_TOKEN_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,127}")
_VERSION_RE = re.compile(r"3(?:\.[0-9]{1,2})?")
_SHORT_PORT_RE = re.compile(r"([0-9]{1,5}):([0-9]{1,5})(?:/(tcp|udp))?")
_DURATION_RE = re.compile(r"(-?)((?:[0-9]{1,9}(?:\.[0-9]{1,9})?(?:ms|us|µs|ns|h|m|s))+)")
_DURATION_PART = re.compile(r"([0-9.]+)(ms|us|µs|ns|h|m|s)")
_UNIT_SECONDS = {"h": 3600.0, "m": 60.0, "s": 1.0, "ms": 1e-3, "us": 1e-6, "µs": 1e-6, "ns": 1e-9}


def _short(value, limit=40):
    text = repr(value)
    return text if len(text) <= limit else text[:limit] + "..."


def _text(value, what, limit=MAX_TEXT):
    """A string of at most ``limit`` characters without NUL bytes."""
    if not isinstance(value, str):
        raise InvalidSpec(f"{what} must be a string, not {type(value).__name__}", fix=f"write {what} as text")
    if len(value) > limit:
        raise InvalidSpec(f"{what} is {len(value)} characters long (at most {limit})", fix=f"shorten {what}")
    if "\0" in value:
        raise InvalidSpec(f"{what} holds a NUL byte", fix=f"remove the '\\0' from {what}")
    return value


def _name(value, what):
    """:func:`labkit.wire.specs.check_name`, with a short message for a long value."""
    if isinstance(value, str) and len(value) > 63:
        raise InvalidSpec(f"{what} {_short(value)} is longer than 63 characters",
                          fix="use 1-63 characters from a-z, 0-9, '_', '.', '-', e.g. 'web'")
    return check_name(value, what)


def _items(value, what, example):
    """A list or tuple of at most MAX_ITEMS items."""
    if not isinstance(value, (list, tuple)):
        raise InvalidSpec(f"{what} must be a list, not {type(value).__name__}", fix=f"e.g. {what}: {example}")
    if len(value) > MAX_ITEMS:
        raise InvalidSpec(f"{what} has {len(value)} items (at most {MAX_ITEMS})", fix=f"give at most {MAX_ITEMS}")
    return value


def _whole(value, what, low, high, fix):
    """:func:`labkit.wire.specs.whole_number`, with a short message for a long string."""
    if isinstance(value, str) and len(value) > 20:
        raise InvalidSpec(f"{what}={_short(value)} is not a whole number", fix=fix)
    return whole_number(value, what, low, high, fix)


def _seconds(value, what, low, high, example="0.5"):
    """A finite number of seconds in low..high, as a float."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise InvalidSpec(f"{what}={_short(value)} is not a number of seconds", fix=f"e.g. {example}")
    if not low <= value <= high:
        raise InvalidSpec(f"{what}={value:g} s is out of range ({low:g}..{high:g} s)",
                          fix=f"give {low:g} to {high:g} seconds, e.g. {example}")
    return float(value)


def _argv(value, what, example):
    """A program and its arguments: a non-empty list of bounded strings."""
    if isinstance(value, str):
        raise InvalidSpec(f"{what} must be a list of arguments, not a string", fix=f"e.g. {example}")
    for i, arg in enumerate(_items(value, what, example)):
        _text(arg, f"{what}[{i}]")
    argv = argv_tuple(value, what, example)
    if not argv:
        raise InvalidSpec(f"{what} is empty", fix=f"e.g. {example}")
    return argv


def _pairs(value, what):
    """Environment (name, value) pairs from a dict or a list of pairs, each string bounded."""
    _items(list(value) if isinstance(value, dict) else value, what, "[('LANG', 'C.UTF-8')]")
    pairs = env_pairs(value)
    for k, v in pairs:
        _text(k, f"{what} name", 256)
        _text(v, f"{what} value of {k}")
    return pairs


@dataclass(frozen=True)
class Publish(Spec):
    """A port published on every node (Swarm's ingress): ``published`` there reaches ``target`` in a task."""
    published: int
    target: int
    proto: str = "tcp"

    _what = "publish"
    _example = "{'published': 8080, 'target': 80}"

    @classmethod
    def parse(cls, text):
        """Compose's short syntax: "8080:80" or "5353:53/udp"."""
        m = _SHORT_PORT_RE.fullmatch(text) if isinstance(text, str) else None
        if not m:
            raise InvalidSpec(f"port {_short(text)} is not PUBLISHED:TARGET[/tcp|/udp]",
                              fix="e.g. '8080:80' or '5353:53/udp' (quoted in YAML; no host address, range or "
                                  "random port)")
        return cls(int(m.group(1)), int(m.group(2)), m.group(3) or "tcp")

    def __post_init__(self):
        object.__setattr__(self, "published", check_port(self.published, "published port"))
        object.__setattr__(self, "target", check_port(self.target, "target port"))
        if self.proto not in ("tcp", "udp"):
            raise InvalidSpec(f"protocol {_short(self.proto)} is not known", fix="use 'tcp' or 'udp'")


@dataclass(frozen=True)
class HealthCheck(Spec):
    """A command run in each task every ``interval`` seconds; ``retries`` failures in a row after the first
    ``start_period`` seconds make the task unhealthy. Exit 0 is healthy; a check still running after
    ``timeout`` seconds has failed (Docker's default is 30 s; the manager waits for the checks due at each of
    its steps, so a check that hangs holds that step up to this long: 10 s, enough for a check that starts
    a process on a slow, emulated machine)."""
    cmd: tuple[str, ...]
    interval: float = 0.5
    retries: int = 3
    start_period: float = 0.0
    timeout: float = 10.0

    _what = "healthcheck"
    _example = "{'cmd': ['wget', '-q', '-O-', 'http://localhost/']}"

    def __post_init__(self):
        set_ = lambda k, v: object.__setattr__(self, k, v)  # noqa: E731 (frozen dataclass normalisation)
        set_("cmd", _argv(self.cmd, "health check cmd", "['wget', '-q', '-O-', 'http://localhost/']"))
        set_("interval", _seconds(self.interval, "health check interval", 0.05, MAX_SECONDS))
        set_("retries", _whole(self.retries, "health check retries", 1, 100, "give 1 to 100 retries, e.g. 3"))
        set_("start_period", _seconds(self.start_period, "health check start_period", 0.0, MAX_SECONDS))
        set_("timeout", _seconds(self.timeout, "health check timeout", 0.1, MAX_HEALTH_TIMEOUT))

    @property
    def window(self):
        """Seconds within which a failing task is found unhealthy: start_period + interval x (retries + 1)."""
        return self.start_period + self.interval * (self.retries + 1)


@dataclass(frozen=True)
class ServiceSpec(Spec):
    """A replicated service: ``replicas`` tasks of ``image``, one per slot 1..replicas.

    - ``cmd``: the program (None: the image's Cmd); ``env``: (name, value) pairs added to the image's;
    - ``ports``: :class:`Publish` (or their dicts, or "8080:80"); ``networks``: the overlay networks its
      tasks join; ``health``: a :class:`HealthCheck` or None;
    - a rolling update (a new ``image``) replaces ``update_parallelism`` slots at a time, each batch
      ``update_delay`` seconds after the last new task began running (:func:`reconcile`);
      ``update_failure_action`` says what the caller does when :func:`update_failed`: "rollback"
      (reconcile with the previous spec), "pause" or "continue".
    """
    name: str
    image: str
    replicas: int = 1
    cmd: tuple[str, ...] | None = None
    env: tuple[tuple[str, str], ...] = ()
    ports: tuple[Publish, ...] = ()
    networks: tuple[str, ...] = ()
    health: HealthCheck | None = None
    update_parallelism: int = 1
    update_delay: float = 0.0
    update_failure_action: str = "rollback"

    _what = "service"
    _example = "{'name': 'demo_web', 'image': 'busybox', 'replicas': 2}"

    def __post_init__(self):
        set_ = lambda k, v: object.__setattr__(self, k, v)  # noqa: E731 (frozen dataclass normalisation)
        _name(self.name, "service name")
        if len(self.name) > MAX_SERVICE_NAME:
            raise InvalidSpec(f"service name {self.name!r} is longer than {MAX_SERVICE_NAME} characters",
                              fix="shorten it (a stack's <stack>_<service> too): its tasks' containers are named "
                                  "<service>.<slot>.<task id>, in at most 63 characters")
        set_("image", str(ImageRef.parse(_text(self.image, "image", 512))))
        set_("replicas", _whole(self.replicas, "replicas", 0, MAX_REPLICAS,
                                f"give 0 to {MAX_REPLICAS} replicas, e.g. replicas=2"))
        if self.cmd is not None:
            set_("cmd", _argv(self.cmd, "cmd", "['httpd', '-f']"))
        set_("env", _pairs(self.env, "env"))
        ports = []
        for p in _items(self.ports, "ports", "['8080:80']"):
            port = p if isinstance(p, Publish) else Publish.parse(p) if isinstance(p, str) else Publish.from_dict(p)
            if any((q.published, q.proto) == (port.published, port.proto) for q in ports):
                raise InvalidSpec(f"published port {port.published}/{port.proto} is published twice",
                                  fix="publish each port once (a published port is one service's on every node)")
            ports.append(port)
        set_("ports", tuple(ports))
        set_("networks", tuple(_name(n, "network name") for n in _items(self.networks, "networks", "['demo_front']")))
        if len(set(self.networks)) != len(self.networks):
            raise InvalidSpec(f"networks {list(self.networks)} name a network twice", fix="list each network once")
        if self.health is not None and not isinstance(self.health, HealthCheck):
            set_("health", HealthCheck.from_dict(self.health))
        set_("update_parallelism", _whole(self.update_parallelism, "update_parallelism", 1, MAX_REPLICAS,
                                          f"replace 1 to {MAX_REPLICAS} slots at a time, e.g. 1"))
        set_("update_delay", _seconds(self.update_delay, "update_delay", 0.0, MAX_SECONDS))
        if self.update_failure_action not in FAILURE_ACTIONS:
            raise InvalidSpec(f"update_failure_action {_short(self.update_failure_action)} is not known",
                              fix="use " + ", ".join(FAILURE_ACTIONS))


@dataclass(frozen=True)
class StackSpec(Spec):
    """Services deployed together (``docker stack deploy``): every service named ``<stack>_<service>``, every
    network ``<stack>_<network>``, and each network a service joins is one of ``networks``."""
    name: str
    services: tuple[ServiceSpec, ...]
    networks: tuple[str, ...] = ()

    _what = "stack"
    _example = "{'name': 'demo', 'services': [{'name': 'demo_web', 'image': 'busybox'}]}"

    def __post_init__(self):
        set_ = lambda k, v: object.__setattr__(self, k, v)  # noqa: E731 (frozen dataclass normalisation)
        _name(self.name, "stack name")
        services = _items(self.services, "services", "[ServiceSpec('demo_web', 'busybox')]")
        if not 1 <= len(services) <= MAX_SERVICES:
            raise InvalidSpec(f"a stack has 1 to {MAX_SERVICES} services, not {len(services)}",
                              fix=f"split it into stacks of at most {MAX_SERVICES} services")
        set_("services", tuple(s if isinstance(s, ServiceSpec) else ServiceSpec.from_dict(s) for s in services))
        set_("networks", tuple(_name(n, "network name") for n in _items(self.networks, "networks", "['demo_default']")))
        prefix = self.name + "_"
        for owner, names in (("network", self.networks), ("service", [s.name for s in self.services])):
            for n in names:
                if not n.startswith(prefix) or n == prefix:
                    raise InvalidSpec(f"{owner} {n!r} is not named for stack {self.name!r}",
                                      fix=f"name it {prefix}<name>, as docker stack deploy does")
                if names.count(n) > 1:
                    raise InvalidSpec(f"{owner} {n!r} appears twice in stack {self.name!r}", fix="give it once")
        published = {}
        for s in self.services:
            for n in s.networks:
                if n not in self.networks:
                    raise InvalidSpec(f"service {s.name!r} joins network {n!r}, which stack {self.name!r} lacks",
                                      fix=f"add {n!r} to the stack's networks")
            for p in s.ports:
                other = published.setdefault((p.published, p.proto), s.name)
                if other != s.name:
                    raise InvalidSpec(f"services {other!r} and {s.name!r} both publish port {p.published}/{p.proto}",
                                      fix="publish each port in one service only (it is published on every node)")

    @classmethod
    def from_compose(cls, name, data):
        """The stack ``name`` from a Compose file (format 3), already parsed (YAML's mapping as a dict).

        labkit reads ``version``, ``services`` and ``networks``; per service ``image``, ``command``,
        ``environment``, ``ports``, ``networks``, ``deploy`` (``mode: replicated``, ``replicas``,
        ``update_config``) and ``healthcheck``. Every other key, known to the format or not, is refused by
        its path. A service with no networks joins ``<stack>_default``; a network's driver (overlay or bridge)
        makes no difference in labkit; a network no service joins is left out (Docker does not create it either)."""
        _name(name, "stack name")
        _compose_keys(data, "", _TOP, _TOP_UNSUPPORTED, "{'services': {'web': {'image': 'busybox'}}}")
        if "version" in data:
            version = data["version"]
            if isinstance(version, (int, float)) and not isinstance(version, bool):
                raise InvalidSpec(f"version: {version} is a number", fix=f"quote it: version: '{version}'")
            if not isinstance(version, str) or not _VERSION_RE.fullmatch(version):
                raise InvalidSpec(f"version: {_short(version)} is not Compose file format 3",
                                  fix="labkit reads format 3: write version: '3.8' (or leave version out)")
        services = data.get("services")
        if not isinstance(services, dict) or not services:
            raise InvalidSpec("services: a compose file needs at least one service",
                              fix="e.g. services: {web: {image: busybox}}")
        if len(services) > MAX_SERVICES:
            raise InvalidSpec(f"services: {len(services)} services (a stack has at most {MAX_SERVICES})",
                              fix=f"split it into stacks of at most {MAX_SERVICES} services")
        declared = _compose_networks(data.get("networks", {}))
        specs = [_compose_service(name, key, body, declared) for key, body in services.items()]
        used = {n for s in specs for n in s.networks}
        networks = [f"{name}_{n}" for n in declared if f"{name}_{n}" in used]
        if f"{name}_default" in used and f"{name}_default" not in networks:
            networks.append(f"{name}_default")
        try:
            return cls(name=name, services=tuple(specs), networks=tuple(networks))
        except InvalidSpec as err:
            raise InvalidSpec(f"stack {name}: {err.message}", fix=err.fix) from None


_TOP = ("version", "services", "networks")
_TOP_UNSUPPORTED = {"volumes": "named volumes", "secrets": "secrets", "configs": "configs"}
_SERVICE = ("image", "command", "environment", "ports", "networks", "deploy", "healthcheck")
_SERVICE_UNSUPPORTED = {
    "build": ("builds", "build and push the image first, then name it in image:"),
    "cap_add": "capability changes", "cap_drop": "capability changes", "cgroup_parent": "cgroup parents",
    "configs": "configs", "secrets": "secrets",
    "container_name": ("container names", "remove it: a task's container is named for its service, slot and id"),
    "credential_spec": "credential specs", "depends_on": "start order (depends_on)", "devices": "devices",
    "dns": "DNS settings", "dns_search": "DNS settings", "dns_opt": "DNS settings", "domainname": "domain names",
    "entrypoint": ("entrypoints", "put the whole program in command:"),
    "env_file": ("env files", "write the variables in environment:"),
    "expose": "exposed ports", "external_links": "links", "links": "links", "extra_hosts": "extra hosts",
    "hostname": "hostnames", "init": "init processes", "ipc": "IPC modes", "isolation": "isolation modes",
    "labels": "labels", "logging": "logging drivers", "mac_address": "MAC addresses",
    "network_mode": ("network modes", "list overlay networks in networks: instead"), "pid": "PID modes",
    "privileged": "privileged containers", "read_only": "read-only roots",
    "restart": ("restart policies", "remove it: a task that ends is always replaced, with a back-off"),
    "security_opt": "security options", "shm_size": "shm sizes", "stdin_open": "stdin", "tty": "terminals",
    "stop_grace_period": "stop grace periods", "stop_signal": "stop signals", "sysctls": "sysctls",
    "tmpfs": "tmpfs mounts", "ulimits": "ulimits", "user": "users", "userns_mode": "user namespace modes",
    "volumes": "volumes", "working_dir": "working directories",
}
_DEPLOY = ("mode", "replicas", "update_config")
_DEPLOY_UNSUPPORTED = {
    "placement": "placement constraints", "resources": "resource limits", "labels": "service labels",
    "endpoint_mode": "endpoint modes",
    "restart_policy": ("restart policies", "remove it: a task that ends is always replaced, with a back-off"),
    "rollback_config": ("rollback settings", "remove it: a rollback is the update's own settings, backwards"),
}
_UPDATE = ("parallelism", "delay", "failure_action")
_UPDATE_UNSUPPORTED = {
    "monitor": ("update monitors", "remove it: a new task counts as failed as long as its health check can tell"),
    "max_failure_ratio": ("failure ratios", "remove it: one failed task fails the update"),
    "order": ("update orders", "remove it: the old task stops, then the new one starts (stop-first)"),
}
_HEALTH = ("test", "interval", "retries", "start_period", "timeout")
_HEALTH_UNSUPPORTED = {"disable": ("disabling health checks", "leave healthcheck out instead")}
_PORT = ("target", "published", "protocol", "mode")
_NETWORK = ("driver",)
_NETWORK_UNSUPPORTED = {"driver_opts": "driver options", "ipam": "IP address management",
                        "external": "external networks",
                        "internal": "internal networks", "attachable": "attachable networks", "labels": "labels",
                        "name": "network names (a network is <stack>_<name>)", "enable_ipv6": "IPv6"}
_SERVICE_NETWORK_UNSUPPORTED = {"aliases": "network aliases", "ipv4_address": "fixed addresses",
                                "ipv6_address": "fixed addresses", "link_local_ips": "link-local addresses",
                                "priority": "network priorities"}


def _at(where, key):
    key = key if isinstance(key, str) and len(key) <= 40 else _short(key)
    return f"{where}.{key}" if where else key


def _compose_keys(data, where, known, unsupported, example):
    """``data`` is a mapping whose keys are all in ``known``; a key of ``unsupported`` (or an x- extension)
    is refused as something labkit does not do, any other as not Compose."""
    if not isinstance(data, dict):
        raise InvalidSpec(f"{where or 'a compose file'} must be a mapping, not {type(data).__name__}",
                          fix=f"e.g. {example}")
    for key in data:
        if key in known:
            continue
        path = _at(where, key)
        if key in unsupported or (isinstance(key, str) and key.startswith("x-")):
            what = unsupported.get(key, ("extension fields", f"remove {path}"))
            what, fix = what if isinstance(what, tuple) else (what, f"remove {path}")
            raise InvalidSpec(f"{path}: labkit's stacks do not do {what}", fix=fix)
        raise InvalidSpec(f"{path}: Compose file format 3 has no such key",
                          fix=f"labkit reads {', '.join(known)} {'in ' + where if where else 'at the top level'}")
    return data


def _duration(value, where, low, high):
    """Seconds from a Compose duration ("10s", "500ms", "1m30s") or a number of seconds, in low..high."""
    if isinstance(value, str) and len(value) <= 64:
        m = _DURATION_RE.fullmatch(value)
        if m:
            seconds = sum(float(n) * _UNIT_SECONDS[u] for n, u in _DURATION_PART.findall(m.group(2)))
            value = -seconds if m.group(1) else seconds
    if isinstance(value, str):
        raise InvalidSpec(f"{where}: {_short(value)} is not a duration", fix="e.g. 10s, 500ms or 1m30s")
    return _seconds(value, where, low, high, "10s, 500ms or 1m30s")


def duration(text, what="duration"):
    """Seconds from a duration as Docker's flags take it ("500ms", "2s", "1m30s", or "0"), 0..MAX_SECONDS."""
    return _duration(0.0 if text == "0" else text, what, 0.0, MAX_SECONDS)


def _compose_networks(data):
    """The top-level networks: their short names, in the file's order."""
    if not isinstance(data, dict):
        raise InvalidSpec(f"networks must be a mapping of names, not {type(data).__name__}",
                          fix="e.g. networks: {front: {driver: overlay}, back: {}}")
    if len(data) > MAX_ITEMS:
        raise InvalidSpec(f"networks: {len(data)} networks (at most {MAX_ITEMS})", fix="declare fewer networks")
    for key, body in data.items():
        _name(key, "networks: network name")
        if body is None:
            continue
        where = _at("networks", key)
        _compose_keys(body, where, _NETWORK, _NETWORK_UNSUPPORTED, "{driver: overlay}")
        if body.get("driver", "overlay") not in ("overlay", "bridge"):
            raise InvalidSpec(f"{where}.driver: {_short(body['driver'])} is not a driver labkit has",
                              fix="use driver: overlay (or bridge, the same in labkit), or leave driver out")
    return list(data)


def _compose_service(stack, key, data, declared):
    """The ServiceSpec of ``services.<key>``."""
    _name(key, "services: service name")
    where = f"services.{key}"
    _compose_keys(data, where, _SERVICE, _SERVICE_UNSUPPORTED, "{image: busybox}")
    if "image" not in data:
        raise InvalidSpec(f"{where} has no image", fix="add image:, e.g. image: busybox (labkit's stacks do not build)")
    fields = {"image": _text(data["image"], f"{where}.image", 512)}
    if "command" in data:
        fields["cmd"] = _compose_command(data["command"], f"{where}.command")
    if "environment" in data:
        fields["env"] = _compose_environment(data["environment"], f"{where}.environment")
    if "ports" in data:
        fields["ports"] = tuple(_compose_port(p, f"{where}.ports[{i}]")
                                for i, p in enumerate(_items(data["ports"], f"{where}.ports", "['8080:80']")))
    nets = _compose_service_networks(data.get("networks", []), f"{where}.networks", declared)
    fields["networks"] = tuple(f"{stack}_{n}" for n in nets or ["default"])
    if "deploy" in data:
        fields.update(_compose_deploy(data["deploy"], f"{where}.deploy"))
    if "healthcheck" in data:
        fields["health"] = _compose_health(data["healthcheck"], f"{where}.healthcheck")
    try:
        return ServiceSpec(name=f"{stack}_{key}", **fields)
    except InvalidSpec as err:
        raise InvalidSpec(f"{where}: {err.message}", fix=err.fix) from None


def _compose_command(value, where):
    if isinstance(value, str):
        _text(value, where)
        try:
            value = shlex.split(value)
        except ValueError as exc:
            raise InvalidSpec(f"{where}: {exc} in {_short(value)}",
                              fix="close the quote, or write the command as a list") from None
    for i, arg in enumerate(_items(value, where, "['httpd', '-f']")):
        if isinstance(arg, bool) or not isinstance(arg, (str, int, float)):
            raise InvalidSpec(f"{where}[{i}]: {_short(arg)} is not an argument", fix="write each argument as a string")
        if isinstance(arg, str):
            _text(arg, f"{where}[{i}]")
    if not value:
        raise InvalidSpec(f"{where} is empty", fix="leave command out to run the image's own command")
    return tuple(a if isinstance(a, str) else str(a) for a in value)


def _compose_environment(value, where):
    if isinstance(value, dict):
        _items(list(value), where, "{LANG: C.UTF-8}")
        pairs = []
        for k, v in value.items():
            _text(k, f"{where} name", 256)
            if v is None:
                raise InvalidSpec(f"{_at(where, k)} has no value (Compose would take the client's own)",
                                  fix=f"give it a value: {k}: value")
            if isinstance(v, bool) or not isinstance(v, (str, int, float)):
                raise InvalidSpec(f"{_at(where, k)}: {_short(v)} is not a string or a number",
                                  fix=f"quote it: {k}: '{str(v).lower()}'" if isinstance(v, bool) else
                                  "write the value as text")
            pairs.append((k, _text(v, _at(where, k)) if isinstance(v, str) else str(v)))
        return tuple(pairs)
    pairs = []
    for i, item in enumerate(_items(value, where, "['LANG=C.UTF-8']")):
        _text(item, f"{where}[{i}]")
        if "=" not in item:
            raise InvalidSpec(f"{where}[{i}]: {_short(item)} has no value (Compose would take the client's own)",
                              fix=f"write {item}=value")
        pairs.append(tuple(item.split("=", 1)))
    return tuple(pairs)


def _compose_port(value, where):
    if isinstance(value, int) and not isinstance(value, bool):
        raise InvalidSpec(f"{where}: {value} is a number (YAML reads 22:22 as 1342, and a lone port is published "
                          "on a random port)", fix="quote the mapping: '8080:80'")
    try:
        if isinstance(value, str):
            return Publish.parse(value)
        _compose_keys(value, where, _PORT, {}, "{target: 80, published: 8080}")
        if "published" not in value or "target" not in value:
            raise InvalidSpec("a port needs both target and published (labkit publishes no random ports)",
                              fix="e.g. {target: 80, published: 8080}")
        if value.get("mode", "ingress") != "ingress":
            raise InvalidSpec(f"mode {_short(value['mode'])}: labkit's stacks do not do host-mode ports",
                              fix="use mode: ingress, or leave mode out")
        return Publish(value["published"], value["target"], value.get("protocol", "tcp"))
    except InvalidSpec as err:
        raise InvalidSpec(err.message if err.message.startswith(where) else f"{where}: {err.message}",
                          fix=err.fix) from None


def _compose_service_networks(value, where, declared):
    if isinstance(value, dict):
        for key, body in _items(list(value.items()), where, "[front, back]"):
            if body is not None:
                _compose_keys(body, _at(where, key), (), _SERVICE_NETWORK_UNSUPPORTED, "null")
        value = list(value)
    names = []
    for i, n in enumerate(_items(value, where, "[front, back]")):
        _name(n, f"{where}[{i}]: network name")
        if n not in declared and n != "default":
            raise InvalidSpec(f"{where}: network {n!r} is not declared",
                              fix=f"declare it at the top level: networks: {{{n}: {{driver: overlay}}}}")
        if n in names:
            raise InvalidSpec(f"{where}: network {n!r} is listed twice", fix="list each network once")
        names.append(n)
    return names


def _compose_deploy(value, where):
    _compose_keys(value, where, _DEPLOY, _DEPLOY_UNSUPPORTED, "{replicas: 2}")
    if value.get("mode", "replicated") != "replicated":
        raise InvalidSpec(f"{where}.mode: labkit's stacks do not do {_short(value['mode'])} services",
                          fix="use mode: replicated with replicas: N, or leave mode out")
    fields = {}
    if "replicas" in value:
        fields["replicas"] = _whole(value["replicas"], f"{where}.replicas", 0, MAX_REPLICAS,
                                    f"give 0 to {MAX_REPLICAS} replicas, e.g. replicas: 2")
    if "update_config" in value:
        update, at = value["update_config"], f"{where}.update_config"
        _compose_keys(update, at, _UPDATE, _UPDATE_UNSUPPORTED, "{parallelism: 1, delay: 10s}")
        if "parallelism" in update:
            fields["update_parallelism"] = _whole(
                update["parallelism"], f"{at}.parallelism", 1, MAX_REPLICAS,
                f"give 1 to {MAX_REPLICAS} (labkit has no 0 for 'all at once': give the number of replicas)")
        if "delay" in update:
            fields["update_delay"] = _duration(update["delay"], f"{at}.delay", 0.0, MAX_SECONDS)
        if "failure_action" in update:
            if update["failure_action"] not in FAILURE_ACTIONS:
                raise InvalidSpec(f"{at}.failure_action: {_short(update['failure_action'])} is not known",
                                  fix="use " + ", ".join(FAILURE_ACTIONS))
            fields["update_failure_action"] = update["failure_action"]
    return fields


def _compose_health(value, where):
    _compose_keys(value, where, _HEALTH, _HEALTH_UNSUPPORTED, "{test: [CMD, true], interval: 1s}")
    if "test" not in value:
        raise InvalidSpec(f"{where} has no test", fix="e.g. test: [CMD, wget, -q, -O-, http://localhost/]")
    test, at = value["test"], f"{where}.test"
    if isinstance(test, str):
        cmd = ("sh", "-c", _text(test, at))
    elif isinstance(test, list) and test and test[0] == "CMD":
        if len(test) < 2:
            raise InvalidSpec(f"{at}: CMD needs a program after it",
                              fix="e.g. test: [CMD, wget, -q, -O-, http://localhost/]")
        cmd = tuple(test[1:])
    elif isinstance(test, list) and test and test[0] == "CMD-SHELL":
        if len(test) != 2 or not isinstance(test[1], str):
            raise InvalidSpec(f"{at}: CMD-SHELL takes one string, the shell's command",
                              fix="e.g. test: [CMD-SHELL, 'wget -q -O- http://localhost/ || exit 1']")
        cmd = ("sh", "-c", _text(test[1], f"{at}[1]"))
    elif isinstance(test, list) and test == ["NONE"]:
        raise InvalidSpec(f"{at}: labkit's stacks do not do disabling health checks", fix="leave healthcheck out")
    elif isinstance(test, list):
        raise InvalidSpec(f"{at} must start with CMD or CMD-SHELL, not {_short(test[:1])}",
                          fix="e.g. test: [CMD, wget, -q, -O-, http://localhost/] or test: 'wget -q -O- localhost'")
    else:
        raise InvalidSpec(f"{at} must be a list or a string, not {type(test).__name__}",
                          fix="e.g. test: [CMD, wget, -q, -O-, http://localhost/] or test: 'wget -q -O- localhost'")
    fields = {}
    for key, low, high in (("interval", 0.05, MAX_SECONDS), ("start_period", 0.0, MAX_SECONDS),
                           ("timeout", 0.1, MAX_HEALTH_TIMEOUT)):
        if key in value:
            fields[key] = _duration(value[key], f"{where}.{key}", low, high)
    if "retries" in value:
        fields["retries"] = _whole(value["retries"], f"{where}.retries", 1, 100, "give 1 to 100 retries, e.g. 3")
    try:
        return HealthCheck(cmd, **fields)
    except InvalidSpec as err:
        raise InvalidSpec(f"{at}: {err.message}", fix=err.fix) from None


@dataclass(frozen=True)
class Node(Spec):
    """A machine of the cluster: ``status`` is what the manager last heard (ready or down), ``availability``
    what the operator set: active (takes tasks), pause (keeps its tasks, takes no new ones), drain (gives its
    tasks away)."""
    name: str
    role: str = "worker"
    availability: str = "active"
    status: str = "ready"
    address: str | None = None

    _what = "node"
    _example = "{'name': 'node1', 'role': 'manager'}"

    def __post_init__(self):
        _name(self.name, "node name")
        for field, allowed in (("role", ROLES), ("availability", AVAILABILITIES), ("status", NODE_STATUSES)):
            if getattr(self, field) not in allowed:
                raise InvalidSpec(f"node {field} {_short(getattr(self, field))} is not known",
                                  fix="use " + " or ".join(allowed))
        if self.address is not None and (not _text(self.address, "node address", 255).strip()
                                         or any(c.isspace() for c in self.address)):
            raise InvalidSpec(f"node address {_short(self.address)} is not an address", fix="e.g. '10.213.0.2'")


@dataclass(frozen=True)
class Task(Spec):
    """One try at running slot ``slot`` of ``service``: a container of ``image`` on ``node``.

    ``desired`` is what the manager wants (running, or shutdown once it stopped or orphaned the task);
    ``state`` what happened: new, assigned (to ``node``), starting, running, then complete, failed,
    shutdown, rejected (could not start) or orphaned (its node went down). ``since``: when the record
    last changed (its state or its desired state), in the caller's seconds."""
    id: str
    service: str
    slot: int
    node: str | None
    image: str
    desired: str
    state: str
    container: str | None = None
    error: str | None = None
    since: float = 0.0

    _what = "task"
    _example = ("{'id': 't1', 'service': 'demo_web', 'slot': 1, 'node': 'node1', 'image': 'busybox:latest', "
                "'desired': 'running', 'state': 'running'}")

    def __post_init__(self):
        set_ = lambda k, v: object.__setattr__(self, k, v)  # noqa: E731 (frozen dataclass normalisation)
        _name(self.id, "task id")
        _name(self.service, "service name")
        set_("slot", _whole(self.slot, "slot", 1, MAX_REPLICAS, f"slots are 1..{MAX_REPLICAS}"))
        if self.node is not None:
            _name(self.node, "node name")
        elif self.state in ("assigned", "starting", "running"):
            raise InvalidSpec(f"a task {self.state} on no node", fix="give the node it was assigned to")
        set_("image", str(ImageRef.parse(_text(self.image, "image", 512))))
        if self.desired not in ("running", "shutdown"):
            raise InvalidSpec(f"desired state {_short(self.desired)} is not known", fix="use running or shutdown")
        if self.state not in TASK_STATES:
            raise InvalidSpec(f"task state {_short(self.state)} is not known", fix="use " + ", ".join(TASK_STATES))
        if self.container is not None and (not isinstance(self.container, str) or ".." in self.container
                                           or not _TOKEN_RE.fullmatch(self.container)):
            raise InvalidSpec(f"container {_short(self.container)} is not a container name or id",
                              fix="use 1-128 letters, digits, '_', '.', '-', without '..'")
        if self.error is not None:
            if not isinstance(self.error, str):
                raise InvalidSpec(f"error must be a string, not {type(self.error).__name__}", fix="e.g. 'exit 1'")
            set_("error", self.error[-MAX_TEXT:])
        set_("since", _seconds(self.since, "since", 0.0, math.inf))

    @property
    def live(self):
        """It holds its slot: desired running and not ended yet."""
        return self.desired == "running" and self.state in LIVE_STATES


@dataclass(frozen=True)
class Action(Spec):
    """A step for the caller: ``start`` runs the new ``task`` on ``node``; ``stop`` shuts ``task`` down;
    ``mark`` only records ``task``'s new state. In each, ``task`` is the record to store in place of the old
    one (for stop: desired shutdown; for mark: e.g. orphaned)."""
    kind: str
    task: Task
    node: str | None = None
    reason: str = ""

    _what = "action"
    _example = "{'kind': 'stop', 'task': {...}}"

    def __post_init__(self):
        if self.kind not in ACTION_KINDS:
            raise InvalidSpec(f"action {_short(self.kind)} is not known", fix="use " + ", ".join(ACTION_KINDS))
        if not isinstance(self.task, Task):
            object.__setattr__(self, "task", Task.from_dict(self.task))
        if self.node is not None:
            _name(self.node, "node name")
        if self.kind == "start" and (self.node is None or self.task.node != self.node or not self.task.live):
            raise InvalidSpec("a start needs a live task assigned to the action's node",
                              fix="give node=task.node, with desired running")
        if self.kind == "stop" and self.task.desired != "shutdown":
            raise InvalidSpec("a stop's task must have desired state shutdown",
                              fix="dataclasses.replace(task, desired='shutdown')")
        _text(self.reason, "reason")


def schedule(service, slot, nodes, tasks):
    """The node for a new task of ``service`` (a ServiceSpec or its name) by the spread strategy, or None.

    Eligible nodes are ready and active. Among them: the fewest live tasks of this service, then the fewest
    live tasks in all, then the first name. ``slot`` does not change the choice: spread places every slot
    alike."""
    name = service.name if isinstance(service, ServiceSpec) else service
    mine, total = {}, {}
    for t in tasks:
        if t.live and t.node is not None:
            total[t.node] = total.get(t.node, 0) + 1
            if t.service == name:
                mine[t.node] = mine.get(t.node, 0) + 1
    eligible = [n.name for n in nodes if n.status == "ready" and n.availability == "active"]
    return min(eligible, key=lambda n: (mine.get(n, 0), total.get(n, 0), n), default=None)


def reconcile(services, nodes, tasks, now, new_id, paused=()):
    """One step of the control loop: the actions that bring ``tasks`` towards ``services``. Deterministic.

    ``services`` maps a service's name to its ServiceSpec; ``nodes`` are :class:`Node` s, ``tasks`` every
    :class:`Task` on record (ended ones too: they are the history that back-off reads); ``now`` the time;
    ``new_id()`` gives a fresh task id. The rules, in the order the actions come:

    1. a live task of a service not in ``services`` is stopped;
    2. per service, by name: a live task on a node that is down or unknown is marked orphaned (desired
       shutdown); one on a draining node is stopped; a second live task in a slot is stopped (the running
       one, of the current image, changed last, is kept); slots above ``replicas`` are stopped, highest first;
    3. each slot 1..replicas without a live task (never had one, ended: restart policy "any", orphaned,
       stopped above) gets a new task on the node :func:`schedule` picks, unless no node is eligible or the
       slot backs off: its last BACKOFF_TASKS tasks all failed or were rejected less than BACKOFF_WINDOW
       seconds before ``now``; a live task with no node yet is assigned one;
    4. rolling update: when live tasks run another image than the service's, and every slot 1..replicas has a
       running task (so a slot replaced earlier is in progress until its new task runs), and ``update_delay``
       seconds have passed since the last task of the new image began running, the lowest
       ``update_parallelism`` outdated slots are replaced: the old task stopped, the new one started, in the
       same step (not when no node is eligible), unless the service's name is in ``paused`` (its update was
       paused after a failure: rules 1-3 still hold).

    A start's task is assigned (state "assigned", since ``now``); a stop or mark sets ``since`` to ``now``."""
    step = _Step(nodes, tasks, now, new_id)
    paused = frozenset(paused)
    removed = [t for t in step.view.values() if t.live and t.service not in services]
    for task in sorted(removed, key=lambda t: (t.service, -t.slot, t.id)):
        step.stop(task, f"service {task.service} was removed")
    for name in sorted(services):
        spec = services[name]
        if not isinstance(spec, ServiceSpec) or spec.name != name:
            raise InvalidSpec(f"services[{_short(name)}] is not the ServiceSpec named {name!r}",
                              fix="map each service's name to its spec: {spec.name: spec}")
        step.service(spec, updating=name not in paused)
    return step.actions


class _Step:
    """The state of one :func:`reconcile` step: every task as the actions so far leave it."""

    def __init__(self, nodes, tasks, now, new_id):
        self.nodes = {n.name: n for n in nodes}
        self.view = {t.id: t for t in tasks}
        self.now, self.new_id, self.actions = now, new_id, []

    def record(self, kind, task, reason, node=None):
        self.view[task.id] = task
        self.actions.append(Action(kind, task, node, reason))

    def stop(self, task, reason):
        self.record("stop", dataclasses.replace(task, desired="shutdown", since=self.now), reason)

    def start(self, spec, slot, node, reason):
        task_id = self.new_id()
        if task_id in self.view:
            raise InvalidSpec(f"new_id() gave {_short(task_id)}, which a task already has",
                              fix="make new_id return ids never used before")
        task = Task(task_id, spec.name, slot, node, spec.image, "running", "assigned", since=self.now)
        self.record("start", task, reason, node)

    def place(self, spec, slot, without=None):
        others = (t for t in self.view.values() if t.id != without)
        return schedule(spec, slot, self.nodes.values(), others)

    def live(self, name):
        return sorted((t for t in self.view.values() if t.service == name and t.live), key=lambda t: (t.slot, t.id))

    def service(self, spec, updating=True):
        for t in self.live(spec.name):
            if t.node is None:
                continue
            node = self.nodes.get(t.node)
            if node is None or node.status == "down":
                self.record("mark", dataclasses.replace(t, desired="shutdown", state="orphaned", since=self.now),
                            f"node {t.node} is " + ("down" if node else "not in the cluster"))
            elif node.availability == "drain":
                self.stop(t, f"node {t.node} is drained")
        slots = {}
        for t in self.live(spec.name):
            slots.setdefault(t.slot, []).append(t)
        for slot, held in sorted(slots.items()):
            keep = max(held, key=lambda t: (t.state == "running", t.image == spec.image, t.since, t.id))
            for t in held:
                if t is not keep:
                    self.stop(t, f"slot {slot} already has task {keep.id}")
            slots[slot] = keep
        for slot in sorted(slots, reverse=True):
            if slot > spec.replicas:
                self.stop(slots.pop(slot), f"scaled down to {spec.replicas} replicas")
        history = {}
        for t in sorted(self.view.values(), key=lambda t: (t.since, t.id)):
            if t.service == spec.name:
                history.setdefault(t.slot, []).append(t)
        for slot in range(1, spec.replicas + 1):
            task = slots.get(slot)
            if task is not None and task.node is not None:
                continue
            node = self.place(spec, slot)
            if node is None:
                continue
            if task is not None:
                self.record("start", dataclasses.replace(task, node=node, state="assigned", since=self.now),
                            f"slot {slot}: assigned to {node}", node)
            elif not _backing_off(history.get(slot, []), self.now):
                last = history.get(slot)
                self.start(spec, slot, node, f"slot {slot}: replaces {last[-1].id}" if last else f"slot {slot} is new")
        if updating:
            self.update(spec)

    def update(self, spec):
        live = {t.slot: t for t in self.live(spec.name) if t.slot <= spec.replicas}
        outdated = [live[s] for s in sorted(live) if live[s].image != spec.image]
        if not outdated or any(s not in live or live[s].state != "running" for s in range(1, spec.replicas + 1)):
            return
        updated = [t.since for t in live.values() if t.image == spec.image]
        if updated and self.now < max(updated) + spec.update_delay:
            return
        for old in outdated[:spec.update_parallelism]:
            node = self.place(spec, old.slot, without=old.id)
            if node is None:
                return
            self.stop(old, f"update to {spec.image}")
            self.start(spec, old.slot, node, f"slot {old.slot}: update to {spec.image}, replaces {old.id}")


def _backing_off(history, now):
    """Whether a slot's last BACKOFF_TASKS tasks (``history`` is in order of ``since``) all failed less than
    BACKOFF_WINDOW seconds ago."""
    last = history[-BACKOFF_TASKS:]
    return len(last) == BACKOFF_TASKS and all(t.state in FAILED_STATES and now - t.since < BACKOFF_WINDOW
                                              for t in last)


def update_failed(service, tasks, now):
    """Whether the rolling update to ``service.image`` has failed, judged from ``tasks`` alone.

    It looks only at the tasks of ``service.name``, with a window of W seconds: UPDATE_MONITOR, or the
    health check's :attr:`HealthCheck.window` when longer. True when both hold:

    - the update is under way: a task of another image is live in a slot 1..replicas (not replaced yet), or
      has desired state shutdown and ``since`` at most W before ``now`` (replaced lately: the last batch);
    - a task of ``service.image`` is failed or rejected, with ``since`` at most W before ``now`` (older
      failures of the same image, e.g. of an earlier attempt that was rolled back, do not count).

    Call it with the spec being rolled out, not with the previous one during a rollback."""
    window = max(UPDATE_MONITOR, service.health.window if service.health else 0.0)
    recent = lambda t: now - t.since <= window  # noqa: E731
    mine = [t for t in tasks if t.service == service.name]
    under_way = any(t.image != service.image and ((t.live and t.slot <= service.replicas)
                                                  or (t.desired == "shutdown" and recent(t))) for t in mine)
    return under_way and any(t.image == service.image and t.state in FAILED_STATES and recent(t) for t in mine)
