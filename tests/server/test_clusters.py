"""clusters/: every file validated by its owner's own schema (Ray's cluster launcher, Ray Serve,
Modal), and the launch recipe proven on a real 2-node Ray cluster on this machine: `ray job submit
-- twinkle serve` places the model's workers on the node with the model's resource, a Tinker SDK
client trains, saves, samples and loads through it, and `ray job stop` ends everything it started.
A model the cluster cannot hold is refused at start, naming what is missing.

The cluster's nodes use private temp dirs and ports and are stopped by killing the processes this
module started (never `ray stop`, which would stop every Ray on the host).
"""

from __future__ import annotations

import copy
import datetime
import json
import math
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
import yaml

from tests.server.sdk_sessions import sdk_session
from twinkle.actors.group import placement_problem
from twinkle.config import load_config
from twinkle.devserver import free_port

REPO = Path(__file__).resolve().parents[2]
CLUSTERS = REPO / "clusters"
VENV_BIN = Path(sys.executable).parent
LAUNCHER_CONFIGS = ["gpu.yaml", "gpu-gcp.yaml", "onprem.yaml"]
SERVER_CONFIGS = ["twinkle-gpu.yaml", "twinkle-onprem.yaml"]
SERVE_CONFIGS = ["serve.yaml", "rayservice.yaml"]
LABEL = "twinkle_test_worker"  # the custom resource only the second node has
KEY = "tml-cluster-key"

pytestmark = pytest.mark.timeout(420)


# ------------------------------------------------------------ offline: schemas
def _launcher(name: str) -> dict:
    return yaml.safe_load((CLUSTERS / name).read_text())


def _ray_validate(config: dict) -> dict:
    from ray.autoscaler._private.util import prepare_config, validate_config

    prepared = prepare_config(copy.deepcopy(config))
    validate_config(prepared)
    return prepared


def test_every_yaml_in_clusters_is_checked_by_a_test():
    yamls = {path.name for path in CLUSTERS.glob("*.yaml")}
    assert yamls == set(LAUNCHER_CONFIGS + SERVER_CONFIGS + SERVE_CONFIGS)
    assert (CLUSTERS / "README.md").is_file() and (CLUSTERS / "modal_app.py").is_file()


@pytest.mark.parametrize("name", LAUNCHER_CONFIGS)
def test_cluster_launcher_configs_pass_rays_own_schema(name):
    import ray

    config = _launcher(name)
    _ray_validate(config)
    if config["provider"]["type"] == "local":
        assert config["provider"]["worker_ips"] and "available_node_types" not in config
        return
    # GPU workers declare their GPUs, start from zero and go when idle; the image pins our Ray
    workers = {k: v for k, v in config["available_node_types"].items() if k != config["head_node_type"]}
    assert workers and all(t["resources"]["GPU"] >= 1 and t["min_workers"] == 0 for t in workers.values())
    assert config["idle_timeout_minutes"] > 0
    assert f"ray:{ray.__version__}-py311" in config["docker"]["image"]
    # the shared state dir is mounted on every node (host) and passed into the container
    assert any("/mnt/twinkle" in cmd and "mount" in cmd for cmd in config["initialization_commands"])
    assert "--volume=/mnt/twinkle:/mnt/twinkle" in config["docker"]["run_options"]


def test_rays_schema_refuses_broken_cluster_configs():
    import jsonschema

    unknown = _launcher("gpu.yaml") | {"max_worker": 3}  # a typo of max_workers
    with pytest.raises(jsonschema.ValidationError, match="max_worker"):
        _ray_validate(unknown)
    wrong_head = _launcher("gpu.yaml") | {"head_node_type": "gpu-head"}
    with pytest.raises(ValueError, match="head_node_type"):
        _ray_validate(wrong_head)
    local_with_types = _launcher("onprem.yaml") | {"available_node_types": _launcher("gpu.yaml")["available_node_types"],
                                                   "head_node_type": "head"}
    with pytest.raises(Exception, match="not supported for on-premise"):
        _ray_validate(local_with_types)


@pytest.mark.parametrize("name", SERVER_CONFIGS)
def test_twinkle_server_configs_for_the_clusters_load(name):
    config = load_config(CLUSTERS / name)
    assert config.ray.address == "auto" and config.state_dir.startswith("/mnt/twinkle/")
    assert all(model.gpus_per_worker >= 1 for model in config.models)


def _serve_configs() -> list[dict]:
    manifest = yaml.safe_load((CLUSTERS / "rayservice.yaml").read_text())
    assert manifest["kind"] == "RayService" and manifest["apiVersion"] == "ray.io/v1"
    return [yaml.safe_load((CLUSTERS / "serve.yaml").read_text()), yaml.safe_load(manifest["spec"]["serveConfigV2"])]


def test_serve_config_and_rayservice_pass_ray_serves_schema():
    import importlib

    from pydantic import ValidationError
    from ray.serve.schema import ServeDeploySchema

    for raw in _serve_configs():
        schema = ServeDeploySchema.model_validate(raw)
        (application,) = schema.applications
        module, _, attr = application.import_path.partition(":")
        assert callable(getattr(importlib.import_module(module), attr))
        assert "working_dir" not in (application.runtime_env or {})
    broken = _serve_configs()[0]
    broken["applications"][0]["runtime_env"] = {"working_dir": "."}  # a local dir: Serve refuses it
    with pytest.raises(ValidationError, match="remote URIs"):
        ServeDeploySchema.model_validate(broken)


def test_modal_app_imports_without_credentials_and_declares_a_scale_to_zero_gpu_web_function(tmp_path):
    probe = """
import importlib.util, json, warnings
warnings.simplefilter("ignore")
spec = importlib.util.spec_from_file_location("modal_app", "clusters/modal_app.py")
m = importlib.util.module_from_spec(spec); spec.loader.exec_module(m)
import modal
web = m.web
try:
    m.app.function(**{**m.FUNCTION_OPTIONS, "scaledown_window": 1})(lambda: None)
    refused = None
except modal.exception.InvalidError as exc:
    refused = str(exc)
print(json.dumps({"gpu": web._spec_.gpus, "volumes": {k: repr(v) for k, v in web._spec_.volumes.items()},
  "asgi": web._is_web_endpoint() and m.app.registered_web_endpoints == ["web"], "app": m.app.name,
  "min": m.FUNCTION_OPTIONS["min_containers"], "window": m.FUNCTION_OPTIONS["scaledown_window"],
  "refused": refused}))
"""
    env = {k: v for k, v in os.environ.items() if not k.startswith("MODAL_")}
    env["HOME"] = str(tmp_path)  # no ~/.modal.toml: no token anywhere
    done = subprocess.run([sys.executable, "-c", probe], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0, done.stderr[-3000:]
    seen = json.loads(done.stdout.strip().splitlines()[-1])
    assert seen["app"] == "twinkle" and seen["asgi"] is True
    assert seen["gpu"] and seen["volumes"] == {"/state": "modal.Volume.from_name('twinkle-state')"}
    assert seen["min"] == 0 and 2 <= seen["window"] <= 3600
    assert seen["refused"] and "scaledown_window" in seen["refused"]  # Modal validates these settings itself


# ------------------------------------------------------------ placement rules
def test_placement_problem_names_what_the_cluster_lacks():
    cpu_node, labelled = {"CPU": 4.0}, {"CPU": 2.0, LABEL: 1.0}
    assert placement_problem({"CPU": 1, LABEL: 1}, 1, "PACK", [cpu_node, labelled]) is None
    assert placement_problem({"CPU": 1, "GPU": 1}, 1, "PACK", [cpu_node, labelled]) == "no node offers GPU"
    assert "no node offers GPU, nope" == placement_problem({"CPU": 1, "GPU": 1, "nope": 1}, 1, "PACK", [cpu_node])
    assert "CPU 3" in placement_problem({"CPU": 3, LABEL: 1}, 1, "PACK", [cpu_node, labelled])
    assert "have/need" in placement_problem({"CPU": 1, LABEL: 1}, 2, "PACK", [cpu_node, labelled])
    assert placement_problem({"CPU": 1}, 2, "STRICT_PACK", [cpu_node, labelled]) is None
    assert "one node with CPU 6" in placement_problem({"CPU": 3}, 2, "STRICT_PACK", [cpu_node, {"CPU": 3.0}])
    assert placement_problem({"CPU": 1}, 2, "STRICT_SPREAD", [cpu_node, labelled]) is None
    assert "only 2 exist" in placement_problem({"CPU": 1}, 3, "STRICT_SPREAD", [cpu_node, labelled])


def test_model_resources_are_checked_when_the_config_loads():
    from pydantic import ValidationError

    from twinkle.config import ModelConfig

    model = ModelConfig(name="m", gpus_per_worker=1, resources={LABEL: 1})
    assert model.worker_bundle() == {"CPU": 1.0, "GPU": 1.0, LABEL: 1.0}
    with pytest.raises(ValidationError, match="gpus_per_worker"):
        ModelConfig(name="m", resources={"GPU": 1})
    with pytest.raises(ValidationError, match="amounts positive"):
        ModelConfig(name="m", resources={LABEL: 0})


# ------------------------------------------------------------ a real 2-node cluster
def _kill_group(process: subprocess.Popen) -> None:
    """SIGTERM (then SIGKILL) the process group of a `ray start --block` this module started."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        try:
            os.killpg(process.pid, sig)
        except ProcessLookupError:
            return
        try:
            process.wait(timeout=20)
            return
        except subprocess.TimeoutExpired:
            continue


def _kill_tree(process: subprocess.Popen, marker: str) -> None:
    """Stop a node this module started: its process group, then any process naming its temp dir."""
    import psutil

    _kill_group(process)
    for proc in psutil.process_iter(["pid", "cmdline"]):
        try:
            if any(marker in part for part in proc.info["cmdline"] or []):
                proc.kill()
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            pass


def _node_ports() -> list[str]:
    """Free ports for one node's services, and a worker port range of its own (below the ephemeral range)."""
    low = free_port()
    return [f"--node-manager-port={free_port()}", f"--object-manager-port={free_port()}",
            f"--metrics-export-port={free_port()}", f"--dashboard-agent-grpc-port={free_port()}",
            f"--dashboard-agent-listen-port={free_port()}", f"--runtime-env-agent-port={free_port()}",
            f"--min-worker-port={10000 + low % 15000}", f"--max-worker-port={10000 + low % 15000 + 199}"]


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    """A head (no label) and a second node on this machine with the custom resource LABEL."""
    from ray.util.state import list_nodes

    base = tmp_path_factory.mktemp("cluster")
    temp_dir = Path("/tmp") / f"tw-2n-{os.getpid()}"  # short: Ray's socket paths have a length limit
    gcs, dashboard, client = free_port(), free_port(), free_port()
    env = {**os.environ, "RAY_AUTH_MODE": "disabled", "RAY_USAGE_STATS_ENABLED": "0", "HF_HUB_OFFLINE": "1",
           "PATH": f"{VENV_BIN}:{os.environ.get('PATH', '')}"}
    env.pop("RAY_ADDRESS", None)
    ray_cli = str(VENV_BIN / "ray")
    head = subprocess.Popen(
        [ray_cli, "start", "--head", "--block", f"--port={gcs}", "--node-ip-address=127.0.0.1", "--num-cpus=4",
         "--include-dashboard=true", "--dashboard-host=127.0.0.1", f"--dashboard-port={dashboard}",
         f"--ray-client-server-port={client}", f"--temp-dir={temp_dir}", "--disable-usage-stats",
         *_node_ports()],
        env=env, stdout=open(base / "head.log", "w"), stderr=subprocess.STDOUT, start_new_session=True)
    second_cmd = [ray_cli, "start", "--block", f"--address=127.0.0.1:{gcs}", "--node-ip-address=127.0.0.1",
                  "--num-cpus=2", f"--resources={json.dumps({LABEL: 1})}"]

    def start_second() -> subprocess.Popen:
        return subprocess.Popen([*second_cmd, *_node_ports()], env=env, stdout=open(base / "second.log", "a"),
                                stderr=subprocess.STDOUT, start_new_session=True)

    nodes: list = []
    second = None
    try:
        address = f"http://127.0.0.1:{dashboard}"
        deadline = time.time() + 240
        while time.time() < deadline and second is None:
            assert head.poll() is None, (base / "head.log").read_text()[-3000:]
            try:
                list_nodes(address=address, timeout=5)
                second = start_second()
            except Exception:  # noqa: BLE001 - the dashboard is still starting
                time.sleep(1)
        assert second is not None, "the head's dashboard never came up"
        restarts = 0
        while time.time() < deadline:
            if second.poll() is not None:
                # Ray gives a raylet 30 s to register, which a loaded machine can miss: start it again
                assert restarts < 2, (base / "second.log").read_text()[-3000:]
                _kill_group(second)
                restarts += 1
                second = start_second()
            nodes = [n for n in list_nodes(address=address, timeout=10) if n.state == "ALIVE"]
            if any(LABEL in (n.resources_total or {}) for n in nodes) and len(nodes) >= 2:
                break
            time.sleep(1)
        labelled_nodes = [n.node_id for n in nodes if LABEL in (n.resources_total or {})]
        assert len(labelled_nodes) == 1, nodes
        yield {"address": address, "client": f"ray://127.0.0.1:{client}", "env": env, "base": base,
               "labelled_node": labelled_nodes[0], "temp_dir": temp_dir}
    finally:
        for process in (second, head):
            if process is not None:
                _kill_tree(process, str(temp_dir))
        shutil.rmtree(temp_dir, ignore_errors=True)


def _ray_job(cluster, *args: str, timeout: float = 120) -> str:
    done = subprocess.run([str(VENV_BIN / "ray"), "job", *args], env=cluster["env"], capture_output=True, text=True,
                          timeout=timeout)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    return done.stdout + done.stderr


def _submit(cluster, name: str, config: dict) -> str:
    path = cluster["base"] / f"{name}.yaml"
    path.write_text(yaml.safe_dump(config))
    runtime_env = {"env_vars": {"TWINKLE_API_KEYS": f"alice:{KEY}", "RAY_JOB_STOP_WAIT_TIME_S": "90",
                                "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}}
    _ray_job(cluster, "submit", f"--address={cluster['address']}", f"--submission-id={name}", "--no-wait",
             f"--runtime-env-json={json.dumps(runtime_env)}", "--", "twinkle", "serve", "--config", str(path))
    return name


def _job_status(cluster, job_id: str) -> str:
    from ray.job_submission import JobSubmissionClient

    return str(JobSubmissionClient(cluster["address"]).get_job_status(job_id).value)


def _job_logs(cluster, job_id: str) -> str:
    from ray.job_submission import JobSubmissionClient

    return JobSubmissionClient(cluster["address"]).get_job_logs(job_id)


def _port_open(port: int) -> bool:
    with socket.socket() as sock:
        return sock.connect_ex(("127.0.0.1", port)) == 0


def _alive_actors(cluster) -> list:
    from ray.util.state import list_actors

    return list_actors(address=cluster["address"], filters=[("state", "=", "ALIVE")], limit=1000, timeout=30)


def _train_save_sample_load(url: str) -> dict:
    from tinker import types

    with sdk_session(url, KEY) as service:
        client = service.create_lora_training_client(base_model="twinkle-tiny", rank=4, seed=3)
        client = client.result() if hasattr(client, "result") else client
        tokens = list(range(40, 72))
        datum = types.Datum(model_input=types.ModelInput.from_ints(tokens[:-1]),
                            loss_fn_inputs={"target_tokens": tokens[1:], "weights": [1.0] * (len(tokens) - 1)})
        losses = []
        for _ in range(6):
            fb = client.forward_backward([datum], "cross_entropy")
            client.optim_step(types.AdamParams(learning_rate=1e-2)).result()
            losses.append(fb.result().metrics["loss:sum"])
        path = client.save_state("on-node-two").result().path
        sampler = client.save_weights_and_get_sampling_client().result()
        out = sampler.sample(types.ModelInput.from_ints(tokens[:8]), num_samples=1,
                             sampling_params=types.SamplingParams(max_tokens=6, temperature=0.0)).result()
        restored = service.create_training_client_from_state(path).result()
        loaded = restored.forward([datum], "cross_entropy").result()
        trained = client.forward([datum], "cross_entropy").result()
        return {"losses": losses, "path": path, "sample": list(out.sequences[0].tokens),
                "loaded": loaded.metrics["loss:sum"], "trained": trained.metrics["loss:sum"]}


def _wait_healthy(cluster, job_id: str, port: int, timeout_s: float = 240) -> float:
    started = time.time()
    while time.time() - started < timeout_s:
        status = _job_status(cluster, job_id)
        assert status in ("PENDING", "RUNNING"), f"job {status}:\n{_job_logs(cluster, job_id)[-4000:]}"
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/api/v1/healthz", timeout=2) as reply:
                if reply.status == 200:
                    return time.time() - started
        except OSError:
            pass
        time.sleep(1)
    raise AssertionError(f"not healthy in {timeout_s}s:\n{_job_logs(cluster, job_id)[-4000:]}")


def test_ray_job_serves_on_the_labelled_node_and_ray_job_stop_ends_it(cluster):
    port = free_port()
    state_dir = cluster["base"] / "state"
    config = {"host": "127.0.0.1", "port": port, "state_dir": str(state_dir), "ray": {"address": "auto"},
              "models": [{"name": "twinkle-tiny", "resources": {LABEL: 1}, "num_threads": 1}]}
    job = _submit(cluster, "twinkle-serve", config)
    ready_s = _wait_healthy(cluster, job, port)
    assert "is shared by all 2 nodes" in _job_logs(cluster, job)  # the start-up probe ran on node two

    workers = [a for a in _alive_actors(cluster) if a.class_name == "BackendWorker"]
    assert [w.node_id for w in workers] == [cluster["labelled_node"]], workers

    result = _train_save_sample_load(f"http://127.0.0.1:{port}")
    assert all(math.isfinite(x) for x in result["losses"]) and result["losses"][-1] < result["losses"][0], result
    assert result["sample"], result
    assert math.isclose(result["loaded"], result["trained"], rel_tol=1e-5), result  # the checkpoint round trips
    # written by the worker on node two, into the state dir every node shares
    saved = list(state_dir.rglob("on-node-two"))
    assert saved and any((p / "adapter_model.safetensors").is_file() for p in saved), saved

    # power users: the Twinkle client's Ray mode through the head's ray:// port reaches the same server
    probe = ("from twinkle.client import init_ray_client; import sys; "
             f"b = init_ray_client({cluster['client']!r}, {KEY!r}); print('session', b.session_id); b.close()")
    done = subprocess.run([sys.executable, "-c", probe], env=cluster["env"], capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0 and "session " in done.stdout, done.stderr[-3000:]

    stop_started = time.time()
    _ray_job(cluster, "stop", f"--address={cluster['address']}", job, timeout=150)
    while _job_status(cluster, job) not in ("STOPPED", "SUCCEEDED", "FAILED") and time.time() - stop_started < 120:
        time.sleep(0.5)
    stop_s = time.time() - stop_started
    assert _job_status(cluster, job) == "STOPPED"
    logs = _job_logs(cluster, job)
    assert "Twinkle stopped." in logs, logs[-3000:]  # SIGTERM reached the driver, which stopped cleanly
    assert not _port_open(port), "the Serve proxy still listens after ray job stop"
    leftovers = [a.class_name for a in _alive_actors(cluster)
                 if a.class_name in ("ServeController", "ProxyActor", "ModelScheduler", "BackendWorker")
                 or "TwinkleIngress" in (a.class_name or "")]
    assert leftovers == [], leftovers
    print(f"\n[clusters] job healthy in {ready_s:.1f}s, ray job stop finished in {stop_s:.1f}s")


def test_a_model_the_cluster_cannot_hold_fails_at_start_naming_the_missing_resources(cluster):
    port = free_port()
    config = {"host": "127.0.0.1", "port": port, "state_dir": str(cluster["base"] / "state-big"),
              "ray": {"address": "auto", "namespace": "twinkle-too-big"},
              "models": [{"name": "twinkle-tiny", "num_workers": 2, "gpus_per_worker": 1,
                          "resources": {"a100_node": 1}}]}
    started = time.time()
    job = _submit(cluster, "twinkle-too-big", config)
    while _job_status(cluster, job) in ("PENDING", "RUNNING") and time.time() - started < 90:
        time.sleep(0.5)
    elapsed = time.time() - started
    logs = _job_logs(cluster, job)
    assert _job_status(cluster, job) == "FAILED", logs[-3000:]
    assert "no node offers GPU, a100_node" in logs and "models[twinkle-tiny]" in logs, logs[-3000:]
    assert elapsed < 60, elapsed  # the job's own start-up (a driver process joining Ray) included
    joined = next(line for line in logs.splitlines() if "joined Ray cluster" in line)
    joined_at = datetime.datetime.strptime(joined[:23], "%Y-%m-%d %H:%M:%S,%f").timestamp()
    from ray.job_submission import JobSubmissionClient

    refused_s = JobSubmissionClient(cluster["address"]).get_job_info(job).end_time / 1000 - joined_at
    assert refused_s < 10, refused_s  # from joining Ray to refusing: no wait on a placement group
    assert not _port_open(port)
    print(f"\n[clusters] infeasible model refused {refused_s:.1f}s after joining Ray ({elapsed:.1f}s from submit)")
