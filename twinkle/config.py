"""The server's configuration: a strict, validated schema with defaults that work on a laptop.

`twinkle serve --config FILE` loads YAML into `ServerConfig`; `twinkle check-config FILE` only
validates it. Unknown keys are errors, so a typo never silently falls back to a default.
"""

from __future__ import annotations

import ipaddress
import os
from pathlib import Path
from typing import Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

API_KEYS_ENV = "TWINKLE_API_KEYS"
ADMIN_KEYS_ENV = "TWINKLE_ADMIN_KEYS"


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class SamplerConfig(_Strict):
    """Where sampling runs: on the training workers (colocated) or on separate workers."""

    backend: Literal["transformers", "vllm"] = "transformers"
    num_workers: int = Field(0, ge=0, description="0 = sample on the training workers")
    gpus_per_worker: float = Field(0.0, ge=0)
    max_loaded_adapters: int = Field(8, ge=1, description="sampler weights kept loaded (least recently used "
                                     "beyond this are unloaded)")
    engine_args: dict = Field(default_factory=dict, description="passed to vLLM when backend is vllm")
    # vLLM's knobs (backend: vllm); the workers run in the vLLM environment (make vllm-venv, $TWINKLE_VLLM_PYTHON)
    cpus_per_worker: float = Field(1.0, gt=0)
    max_loras: int = Field(4, ge=1, description="vllm: adapters in one engine step (its batch mixes this many)")
    max_lora_rank: int | None = Field(None, description="vllm: one of 1, 8, 16, 32, 64, 128, 256, 320, 512; "
                                      "default: the smallest that holds the model's max_lora_rank")
    max_model_len: int | None = Field(None, ge=16, description="vllm: default the model's context length")
    tensor_parallel_size: int = Field(1, ge=1, description="vllm: GPUs per engine (set gpus_per_worker to match)")
    gpu_memory_utilization: float = Field(0.9, gt=0, le=1, description="vllm: fraction of each GPU it takes")
    dtype: Literal["float32", "bfloat16", "float16"] | None = Field(None, description="vllm: default the model's")
    cpu_kv_cache_gb: int = Field(1, ge=1, description="vllm on CPU hosts: GiB of KV cache per worker")

    @field_validator("max_lora_rank")
    @classmethod
    def _vllm_rank(cls, rank: int | None) -> int | None:
        allowed = (1, 8, 16, 32, 64, 128, 256, 320, 512)
        if rank is not None and rank not in allowed:
            raise ValueError(f"vLLM accepts max_lora_rank in {allowed}, got {rank}")
        return rank


class ParallelismConfig(_Strict):
    """Model-parallel layout (Megatron backend); data parallelism comes from num_workers."""

    tensor_parallel: int = Field(1, ge=1)
    pipeline_parallel: int = Field(1, ge=1)
    context_parallel: int = Field(1, ge=1)
    expert_parallel: int = Field(1, ge=1)
    sequence_parallel: bool = False


class ModelConfig(_Strict):
    """One base model the server hosts."""

    name: str = Field(description="the name clients use as base_model")
    path: str | None = Field(None, description="Hugging Face id or local folder; default: the name")
    backend: Literal["transformers", "megatron"] = "transformers"
    num_workers: int = Field(1, ge=1, description="data-parallel training ranks, one bundle each")
    cpus_per_worker: float = Field(1.0, gt=0)
    gpus_per_worker: float = Field(0.0, ge=0)
    resources: dict[str, float] = Field(default_factory=dict, description="extra Ray resources each worker needs, "
                                        "e.g. a node label {'a100_node': 1}: the workers land only on nodes "
                                        "that offer them (CPU and GPU go in cpus_/gpus_per_worker)")
    placement_strategy: Literal["PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD"] = "PACK"
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    device: str = Field("auto", description="'auto' picks cuda when the worker has a GPU, else cpu")
    max_lora_rank: int = Field(128, ge=1)
    max_adapters: int = Field(64, ge=1, description="resident training adapters (slots); beyond them the least "
                              "recently used are offloaded to disk and restored on their next request")
    max_context_length: int | None = None
    micro_batch_tokens: int = Field(8192, ge=64, description="padded tokens per forward; bounds activation memory")
    pass_tokens: int = Field(32768, ge=64, description="tokens of forward/forward_backward requests, of any "
                             "tenants, gathered into one shared training pass")
    sample_tokens: int = Field(65536, ge=64, description="tokens (prompt + samples x max_tokens) of sample "
                               "requests gathered into one shared generation")
    batching: Literal["batched", "time_sliced"] = Field(
        "batched", description="time_sliced runs one request per pass (to measure what batching gains)")
    num_threads: int | None = Field(None, ge=1, description="torch threads per worker; default: all cores")
    preload: bool = Field(True, description="start the workers with the server instead of on first use")
    parallelism: ParallelismConfig = Field(default_factory=ParallelismConfig)
    sampler: SamplerConfig = Field(default_factory=SamplerConfig)

    @field_validator("resources")
    @classmethod
    def _custom_resources(cls, resources: dict[str, float]) -> dict[str, float]:
        for key, amount in resources.items():
            if key in ("CPU", "GPU"):
                raise ValueError(f"resources: give {key} as {key.lower()}s_per_worker, not in resources")
            if not key or amount <= 0:
                raise ValueError(f"resources: {key!r}: names must be non-empty and amounts positive, got {amount}")
        return resources

    def worker_bundle(self) -> dict[str, float]:
        """The Ray resources one worker (one placement-group bundle) takes."""
        bundle = {"CPU": self.cpus_per_worker, **self.resources}
        if self.gpus_per_worker:
            bundle["GPU"] = self.gpus_per_worker
        return bundle

    def placement(self) -> tuple[int, dict[str, float]]:
        """(bundles, one bundle) of the model's actor group. A megatron model places one bundle per
        rank: num_workers data-parallel replicas x TP x PP ranks, each rank an equal share of its
        replica's cpus_per_worker / gpus_per_worker (one GPU per rank on GPU machines)."""
        if self.backend != "megatron":
            return self.num_workers, self.worker_bundle()
        per = self.parallelism.tensor_parallel * self.parallelism.pipeline_parallel
        bundle = {k: (v / per if k in ("CPU", "GPU") else v) for k, v in self.worker_bundle().items()}
        return self.num_workers * per, bundle

    @model_validator(mode="after")
    def _megatron_layout(self) -> "ModelConfig":
        per = self.parallelism.tensor_parallel * self.parallelism.pipeline_parallel
        if self.backend == "megatron" and self.gpus_per_worker and self.gpus_per_worker != per:
            raise ValueError(f"backend megatron: gpus_per_worker ({self.gpus_per_worker:g}) are one data-parallel "
                             f"replica's GPUs, one per rank: set it to tensor_parallel x pipeline_parallel = {per}")
        return self

    @property
    def source(self) -> str:
        return self.path or self.name


class AuthConfig(_Strict):
    api_keys: dict[str, str] = Field(default_factory=dict, description="tenant -> API key")
    admin_keys: dict[str, str] = Field(default_factory=dict, description="operator -> key for the operator "
                                       f"routes (/api/v1/admin/...); also ${ADMIN_KEYS_ENV}")

    @field_validator("api_keys", "admin_keys")
    @classmethod
    def _keys_unique(cls, keys: dict[str, str]) -> dict[str, str]:
        for name, key in keys.items():
            if not name or not key:
                raise ValueError("names and keys must be non-empty")
        refuse_shared_keys(keys, "the config")
        return keys


class TenantQuota(_Strict):
    """What one tenant may hold or queue; requests beyond it answer 429 naming the limit."""

    max_models: int = Field(64, ge=1, description="live training models per tenant")
    max_resident_adapters: int = Field(16, ge=1, description="adapters per base model a tenant keeps resident; "
                                       "its least recently used beyond this are offloaded")
    max_queued_requests: int = Field(256, ge=1, description="requests per base model waiting or running")
    max_tokens_per_request: int = Field(262_144, ge=1)
    max_checkpoints: int = Field(1000, ge=1, description="saved checkpoints (named weights and sampler weights)")
    max_checkpoint_bytes: int = Field(100 * 2**30, ge=1, description="disk taken by those checkpoints")
    max_requests_per_s: float = Field(500.0, gt=0, description="HTTP requests per second per ingress replica "
                                      "(bursts to twice this)")


class QuotasConfig(_Strict):
    default: TenantQuota = Field(default_factory=TenantQuota)
    tenants: dict[str, TenantQuota] = Field(default_factory=dict, description="per-tenant overrides")

    def of(self, tenant: str) -> TenantQuota:
        return self.tenants.get(tenant, self.default)


class LimitsConfig(_Strict):
    """What one request may hold; requests beyond it answer 400/413 naming the limit."""

    max_datums_per_request: int = Field(1024, ge=1)
    max_tokens_per_request: int = Field(1_048_576, ge=1)
    max_samples_per_request: int = Field(128, ge=1)
    max_body_bytes: int = Field(64 * 1024 * 1024, ge=1024, description="request body as sent; a compressed "
                                "body may also decompress to at most this many bytes (else 413)")
    max_tensor_elements: int = Field(16 * 1024 * 1024, ge=1024, description="elements of all the tensors of one "
                                     "request once decoded, sparse tensors counted densely (each takes 4-8 bytes); "
                                     "declared shapes are checked against it before anything is allocated")
    max_json_depth: int = Field(64, ge=8, le=512, description="nesting depth of a JSON or msgpack request body")
    max_images_per_request: int = Field(64, ge=1, description="images in all the datums or the prompt of a request")
    max_image_bytes: int = Field(8 * 1024 * 1024, ge=1024, description="encoded size of one image")
    max_image_pixels: int = Field(16 * 1024 * 1024, ge=1, description="width x height of one image as declared "
                                  "in its header, checked before it is decoded (the model's image processor then "
                                  "resizes it to its own pixel budget)")


class TimeoutsConfig(_Strict):
    long_poll_s: float = Field(30.0, gt=0, lt=45, description="must stay below the Tinker SDK's 45 s")
    session_timeout_s: float = Field(300.0, gt=0, description="no heartbeat for this long: session expires")
    adapter_idle_s: float = Field(900.0, gt=0, description="offload adapters idle this long to disk")
    model_idle_release_s: float = Field(600.0, gt=0, description="release a model's workers when unused")
    seq_gap_s: float = Field(10.0, gt=0, description="stop waiting for a missing seq_id after this long")
    autosave_s: float = Field(300.0, ge=0, description="save a training model's full state after its first step "
                              "and then this often, so a worker crash loses at most this much work (0: never)")
    result_ttl_s: float = Field(86400.0, gt=0, description="keep finished results this long")
    progress_log_s: float = Field(15.0, ge=0, description="while a model has work, log one progress line (passes, "
                                  "tokens/s, queue) this often (0: never)")
    sweep_interval_s: float = Field(10.0, gt=0)


class RayConfig(_Strict):
    address: str | None = Field(None, description="None: start an embedded Ray; 'auto' or ray://... to join")
    num_cpus: int | None = Field(None, ge=1, description="logical CPUs of an embedded Ray")
    namespace: str = "twinkle"
    client_server_port: int | None = Field(None, ge=1024, le=65535, description="open a Ray-client port "
                                           "(ray://127.0.0.1:PORT, loopback only: the Ray client has no keys) on "
                                           "the embedded Ray, for Twinkle's Ray mode; on a cluster the head opens "
                                           "it (ray start --head --ray-client-server-port)")
    autoscaling: bool = Field(False, description="the cluster adds nodes on demand (ray up / KubeRay autoscaler): "
                              "a model the present nodes cannot hold waits for new nodes instead of failing at start")
    check_shared_state_dir: bool = Field(True, description="on a multi-node cluster, refuse to start unless every "
                                         "node sees state_dir (a probe file written on each node is read here)")

    @model_validator(mode="after")
    def _client_port_on_embedded_ray(self) -> "RayConfig":
        if self.client_server_port is not None and self.address is not None:
            raise ValueError("ray.client_server_port opens a port on the Ray this server starts; a joined cluster's "
                             "head opens its own (ray start --head --ray-client-server-port=10001): remove one")
        return self


class ServerConfig(_Strict):
    host: str = "127.0.0.1"
    port: int = Field(8000, ge=1, le=65535)
    state_dir: str = "twinkle_state"
    trust_remote_code: bool = Field(False, description="allow clients' pickled custom losses")
    ingress_replicas: int = Field(1, ge=1)
    http_front: Literal["direct", "proxy", "haproxy"] | None = Field(
        None, description="how HTTP reaches the ingress: 'direct' (the replica listens on `port` itself; the "
        "fastest, one ingress replica), 'haproxy' (HAProxy on `port` balancing several ingress replicas, which "
        "listen on every interface), 'proxy' (Ray Serve's proxy actor). Default: direct for one ingress "
        "replica, proxy for more")
    access_log: bool = Field(False, description="log every HTTP request (costs CPU per request)")
    serve_control_loop_s: float = Field(
        1.0, gt=0, le=10, description="how often Ray Serve's controller reconciles its deployments (Serve's "
        "default is 0.1 s; each round asks the GCS for every node's resources, ~5% of a core that the model "
        "workers need on a small machine). Larger: less CPU, replicas replaced that much later after a crash")
    # the embedded text model, and the embedded vision-language model loaded on first use (start stays fast)
    models: list[ModelConfig] = Field(default_factory=lambda: [ModelConfig(name="twinkle-tiny"),
                                                               ModelConfig(name="twinkle-tiny-vl", preload=False)])
    auth: AuthConfig = Field(default_factory=AuthConfig)
    limits: LimitsConfig = Field(default_factory=LimitsConfig)
    quotas: QuotasConfig = Field(default_factory=QuotasConfig)
    timeouts: TimeoutsConfig = Field(default_factory=TimeoutsConfig)
    ray: RayConfig = Field(default_factory=RayConfig)

    @model_validator(mode="after")
    def _unique_models(self) -> "ServerConfig":
        names = [m.name for m in self.models]
        if len(set(names)) != len(names):
            raise ValueError(f"model names must be unique, got {names}")
        if not self.models:
            raise ValueError("configure at least one model")
        return self

    @model_validator(mode="after")
    def _front_fits_replicas(self) -> "ServerConfig":
        if self.http_front == "direct" and self.ingress_replicas > 1:
            raise ValueError(f"http_front 'direct' serves one ingress replica on port {self.port}, but "
                             f"ingress_replicas is {self.ingress_replicas}: use http_front 'haproxy' (or 'proxy') for "
                             "several replicas, or set ingress_replicas: 1")
        return self

    @property
    def resolved_http_front(self) -> str:
        """The front this server uses: the configured one, else direct ingress for one replica."""
        if self.http_front is not None:
            return self.http_front
        return "direct" if self.ingress_replicas == 1 else "proxy"

    def model(self, name: str) -> ModelConfig | None:
        return next((m for m in self.models if m.name == name), None)

    @property
    def is_loopback(self) -> bool:
        if self.host == "localhost":
            return True
        try:
            return ipaddress.ip_address(self.host).is_loopback
        except ValueError:
            return False

    def resolved_keys(self) -> dict[str, str]:
        """tenant -> key from the config, overlaid by $TWINKLE_API_KEYS ("alice:KEY1,bob:KEY2")."""
        keys = dict(self.auth.api_keys)
        keys.update(parse_api_keys(os.environ.get(API_KEYS_ENV, "")))
        refuse_shared_keys(keys, f"auth.api_keys and ${API_KEYS_ENV}")
        return keys

    def resolved_admin_keys(self) -> dict[str, str]:
        """operator -> key from the config, overlaid by $TWINKLE_ADMIN_KEYS ("ops:KEY")."""
        keys = dict(self.auth.admin_keys)
        keys.update(parse_api_keys(os.environ.get(ADMIN_KEYS_ENV, ""), ADMIN_KEYS_ENV))
        if set(keys.values()) & set(self.resolved_keys().values()):
            raise ValueError("an operator key must not also be a tenant's API key")
        return keys

    def check_runnable(self) -> None:
        """Refuse, with the field named, options this build validates but cannot run yet."""
        for model in self.models:
            where = f"models[{model.name}]"
            if model.backend == "megatron":
                _check_megatron_runnable(model, where)
            if model.sampler.backend == "vllm":
                _check_vllm_runnable(model, where)
            elif model.sampler.num_workers:
                raise ValueError(f"{where}.sampler: separate transformers sampler workers are not part of this build "
                                 "yet; sample on the training workers (sampler.num_workers: 0) or use backend: vllm")

    def check_secure(self) -> None:
        """Refuse to listen beyond loopback without keys, or with an operator key a tenant also holds."""
        self.resolved_admin_keys()
        if self.resolved_http_front == "haproxy" and not self.resolved_keys():
            raise ValueError("http_front 'haproxy' makes the ingress replicas listen on every interface: configure "
                             f"API keys (auth.api_keys or ${API_KEYS_ENV}) or use http_front 'direct'")
        if not self.is_loopback and not self.resolved_keys():
            raise ValueError(f"host {self.host!r} is reachable beyond this machine: configure API keys "
                             f"(auth.api_keys or ${API_KEYS_ENV}) or listen on 127.0.0.1")


def _check_megatron_runnable(model: ModelConfig, where: str) -> None:
    """This build's megatron backend runs TP x PP ranks per replica and num_workers replicas (no CP, EP, SP);
    whether TP and PP fit the model's heads and layers is checked against its config (preflight)."""
    par = model.parallelism
    for name in ("context_parallel", "expert_parallel"):
        if getattr(par, name) != 1:
            raise ValueError(f"{where}.parallelism.{name}: not supported by the megatron backend yet; set it to 1")
    if par.sequence_parallel:
        raise ValueError(f"{where}.parallelism.sequence_parallel: not supported by the megatron backend yet; "
                         "set it to false")


def _check_vllm_runnable(model: ModelConfig, where: str) -> None:
    """vLLM samples in workers of its own (never on the training workers), one engine per worker."""
    sampler = model.sampler
    if not sampler.num_workers:
        raise ValueError(f"{where}.sampler.num_workers: sampler backend vllm runs in workers of its own; "
                         "set num_workers to 1 or more")
    if sampler.gpus_per_worker and sampler.gpus_per_worker < sampler.tensor_parallel_size:
        raise ValueError(f"{where}.sampler.gpus_per_worker: an engine with tensor_parallel_size "
                         f"{sampler.tensor_parallel_size} needs that many GPUs; set gpus_per_worker to it")
    rank = sampler.max_lora_rank
    if rank is not None and rank < model.max_lora_rank:
        raise ValueError(f"{where}.sampler.max_lora_rank ({rank}) is below the model's max_lora_rank "
                         f"({model.max_lora_rank}): adapters of that rank could not be sampled; raise it or lower "
                         "max_lora_rank")


def refuse_shared_keys(keys: dict[str, str], where: str) -> None:
    """One key per tenant: a shared key would let one tenant act as (and see the objects of) another."""
    owners: dict[str, list[str]] = {}
    for name, key in keys.items():
        owners.setdefault(key, []).append(name)
    shared = [names for names in owners.values() if len(names) > 1]
    if shared:
        who = "; ".join(" and ".join(sorted(names)) for names in shared)
        raise ValueError(f"{who} share one key (in {where}): give each its own key")


def parse_api_keys(spec: str, source: str = API_KEYS_ENV) -> dict[str, str]:
    keys: dict[str, str] = {}
    for item in filter(None, (part.strip() for part in spec.split(","))):
        tenant, sep, key = item.partition(":")
        if not sep or not tenant.strip() or not key.strip():
            who = "tenant" if source == API_KEYS_ENV else "operator"
            raise ValueError(f"{source} entries look like {who}:key, got {item!r}")
        keys[tenant.strip()] = key.strip()
    return keys


def load_config(path: str | Path | None = None, **overrides) -> ServerConfig:
    """Load YAML (if given), apply non-None overrides (CLI flags), validate."""
    data: dict = {}
    if path:
        text = Path(path).read_text()
        data = yaml.safe_load(text) or {}
        if not isinstance(data, dict):
            raise ValueError(f"{path}: the top level must be a mapping")
    for key, value in overrides.items():
        if value is None:
            continue
        if key == "model":
            data["models"] = [{"name": value}]
        else:
            data[key] = value
    return ServerConfig.model_validate(data)
