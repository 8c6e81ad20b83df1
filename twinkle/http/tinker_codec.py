"""Translating between the Tinker wire formats and Twinkle's plain-data types.

Protobuf messages come from the schema the installed `tinker` package ships
(`tinker/proto/tinker_public_pb2.py`), loaded by file so that this process does not import the
whole SDK (which pulls in torch). JSON shapes are those of SDK <= 0.24.
"""

from __future__ import annotations

import importlib.util
import math
import sys
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np

from twinkle.errors import InvalidInputError, UnprocessableError
from twinkle.types import Datum

PROTOBUF = "application/x-protobuf"


@lru_cache(maxsize=1)
def pb():
    """The `tinker_public_pb2` module of the installed tinker package."""
    name = "tinker.proto.tinker_public_pb2"  # registered under the SDK's own name: one copy per process
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.find_spec("tinker")
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError("the tinker package is not installed; install twinkle[server]")
    path = Path(list(spec.submodule_search_locations)[0]) / "proto" / "tinker_public_pb2.py"
    module_spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(module_spec)
    sys.modules[name] = module
    module_spec.loader.exec_module(module)
    return module


def _np_dtype(code: int):
    m = pb()
    table = {m.DTYPE_FLOAT32: np.float32, m.DTYPE_INT64: np.int64, m.DTYPE_INT32: np.int32,
             m.DTYPE_BFLOAT16: np.uint16}
    if code not in table:
        raise InvalidInputError(f"unsupported tensor dtype code {code}", field="loss_fn_inputs")
    return table[code]


def _widen(array: np.ndarray, code: int) -> np.ndarray:
    if code == pb().DTYPE_BFLOAT16:
        return (array.astype(np.uint32) << 16).view(np.float32)
    if array.dtype == np.int32:
        return array.astype(np.int64)
    return array


def _dense_from_csr(values: np.ndarray, crow: np.ndarray, col: np.ndarray, shape: list[int], field: str,
                    fill: int | float = 0):
    if len(shape) != 2 or len(crow) != shape[0] + 1 or len(col) != len(values):
        raise InvalidInputError(f"malformed sparse tensor (shape {shape})", field=field)
    if len(col) and (col.min() < 0 or col.max() >= shape[1]):
        raise InvalidInputError("sparse column index out of range", field=field)
    out = np.full(shape, fill, dtype=values.dtype)
    for row in range(shape[0]):
        start, end = int(crow[row]), int(crow[row + 1])
        out[row, col[start:end]] = values[start:end]
    return out


def tensor_from_proto(tensor, field: str) -> np.ndarray:
    dtype = _np_dtype(tensor.dtype)
    shape = list(tensor.shape)
    try:
        if tensor.WhichOneof("encoding") == "sparse_csr":
            csr = tensor.sparse_csr
            values = np.frombuffer(csr.values, dtype)
            array = _dense_from_csr(values, np.frombuffer(csr.crow_indices, np.int64),
                                    np.frombuffer(csr.col_indices, np.int64), shape, field)
        else:
            array = np.frombuffer(tensor.dense, dtype).copy()
            if shape:
                array = array.reshape(shape)
    except ValueError as exc:
        raise InvalidInputError(f"tensor bytes do not match its dtype/shape: {exc}", field=field) from None
    return _widen(array, tensor.dtype)


def _tokens_from_chunks(chunks, field: str) -> np.ndarray:
    parts = []
    for chunk in chunks:
        kind = chunk.WhichOneof("chunk")
        if kind != "encoded_text":
            raise UnprocessableError(f"{kind} inputs are not supported by this text model", field=field)
        parts.append(np.frombuffer(chunk.encoded_text.tokens, np.int32).copy())
    return np.concatenate(parts).astype(np.int64) if parts else np.zeros(0, np.int64)


def maybe_decompress(body: bytes, content_encoding: str | None) -> bytes:
    if content_encoding and "zstd" in content_encoding.lower():
        import zstandard

        try:
            return zstandard.ZstdDecompressor().decompressobj().decompress(body)
        except zstandard.ZstdError as exc:
            raise InvalidInputError(f"body is not valid zstd: {exc}", field="body") from None
    return body


def parse_forward_backward_proto(body: bytes, content_encoding: str | None = None) -> dict:
    """Decode a protobuf ForwardBackwardRequest into plain data (datums as `Datum`)."""
    body = maybe_decompress(body, content_encoding)
    request = pb().ForwardBackwardRequest()
    try:
        request.ParseFromString(body)
    except Exception:
        raise InvalidInputError("body is not a valid ForwardBackwardRequest protobuf message", field="body") from None
    config: dict[str, Any] = {k: float(v) for k, v in request.loss_fn_config.items()}
    for key, value in request.loss_fn_config_v2.items():
        config[key] = value.number if value.WhichOneof("value") == "number" else value.text
    data = []
    for i, datum in enumerate(request.data):
        tokens = _tokens_from_chunks(datum.model_input, f"data[{i}].model_input")
        inputs = {k: tensor_from_proto(v, f"data[{i}].loss_fn_inputs.{k}") for k, v in datum.loss_fn_inputs.items()}
        data.append(Datum(input_tokens=tokens, loss_inputs=inputs))
    return {"model_id": request.model_id, "seq_id": int(request.seq_id), "loss_fn": request.loss_fn,
            "loss_fn_config": config or None, "forward_only": bool(request.forward_only), "data": data}


def tensor_from_json(obj: Any, field: str, *, sparse_fill: int | float = 0) -> np.ndarray:
    """A JSON TensorData {data, dtype, shape, sparse_*}; plain lists are accepted too.

    A sparse tensor's unlisted cells become `sparse_fill`.
    """
    if isinstance(obj, list):
        return np.asarray(obj)
    if not isinstance(obj, dict) or "data" not in obj:
        raise InvalidInputError("expected a tensor {data, dtype, shape}", field=field)
    dtype = {"int64": np.int64, "float32": np.float32}.get(obj.get("dtype", "float32"))
    if dtype is None:
        raise InvalidInputError(f"unsupported dtype {obj.get('dtype')!r}", field=field)
    try:
        values = np.asarray(obj["data"], dtype=dtype)
        shape = obj.get("shape")
        if obj.get("sparse_crow_indices") is not None:
            return _dense_from_csr(values, np.asarray(obj["sparse_crow_indices"], np.int64),
                                   np.asarray(obj["sparse_col_indices"], np.int64), list(shape or []), field,
                                   fill=sparse_fill)
        return values.reshape(shape) if shape else values
    except (TypeError, ValueError) as exc:
        raise InvalidInputError(f"malformed tensor: {exc}", field=field) from None


def tokens_from_json_chunks(model_input: Any, field: str) -> np.ndarray:
    if not isinstance(model_input, dict) or not isinstance(model_input.get("chunks"), list):
        raise InvalidInputError("expected {chunks: [...]}", field=field)
    parts = []
    for j, chunk in enumerate(model_input["chunks"]):
        if not isinstance(chunk, dict):
            raise InvalidInputError("chunks must be objects", field=f"{field}.chunks[{j}]")
        kind = chunk.get("type", "encoded_text")
        if kind != "encoded_text":
            raise UnprocessableError(f"{kind} inputs are not supported by this text model", field=field)
        tokens = chunk.get("tokens")
        if not isinstance(tokens, list) or not all(isinstance(t, int) and not isinstance(t, bool) for t in tokens):
            raise InvalidInputError("tokens must be a list of integers", field=f"{field}.chunks[{j}].tokens")
        parts.append(np.asarray(tokens, dtype=np.int64))
    return np.concatenate(parts) if parts else np.zeros(0, np.int64)


def parse_forward_backward_json(body: dict, key: str) -> dict:
    """SDK <= 0.24 JSON: {forward_backward_input|forward_input: {data, loss_fn, loss_fn_config}, model_id, seq_id}."""
    inner = body.get(key)
    if not isinstance(inner, dict) or not isinstance(inner.get("data"), list):
        raise InvalidInputError(f"missing {key}.data", field=key)
    data = []
    for i, datum in enumerate(inner["data"]):
        if not isinstance(datum, dict):
            raise InvalidInputError("datums must be objects", field=f"data[{i}]")
        tokens = tokens_from_json_chunks(datum.get("model_input"), f"data[{i}].model_input")
        raw_inputs = datum.get("loss_fn_inputs") or {}
        if not isinstance(raw_inputs, dict):
            raise InvalidInputError("must be an object", field=f"data[{i}].loss_fn_inputs")
        inputs = {k: tensor_from_json(v, f"data[{i}].loss_fn_inputs.{k}") for k, v in raw_inputs.items()}
        data.append(Datum(input_tokens=tokens, loss_inputs=inputs))
    seq_id = body.get("seq_id")
    return {"model_id": body.get("model_id"), "seq_id": int(seq_id) if seq_id is not None else None,
            "loss_fn": inner.get("loss_fn"), "loss_fn_config": inner.get("loss_fn_config"),
            "forward_only": key == "forward_input", "data": data}


def tinker_metrics(metrics: dict[str, float]) -> dict[str, float]:
    """Metric keys exactly as the SDK merges them: `name:reduction` with one colon."""
    out = {}
    for key, value in metrics.items():
        name, _, reduction = key.rpartition(":")
        if not name:
            name, reduction = key, "mean"
        out[f"{name.replace(':', '_')}:{reduction}"] = float(value)
    return out


def forward_output_proto(result: dict) -> bytes:
    """ForwardResult (as dict) -> ForwardBackwardOutput protobuf bytes."""
    m = pb()
    out = m.ForwardBackwardOutput(loss_fn_output_type="ArrayRecord")
    for key, value in tinker_metrics(result["metrics"]).items():
        out.metrics[key] = value
    outputs = result["loss_outputs"]
    if outputs:
        # one record per group of datums with the same trailing shape (1-D vs top-K)
        groups: list[tuple[tuple, list[dict]]] = []
        for item in outputs:
            trailing = tuple(np.asarray(item["logprobs"]).shape[1:])
            if groups and groups[-1][0] == trailing:
                groups[-1][1].append(item)
            else:
                groups.append((trailing, [item]))
        for trailing, items in groups:
            record = out.loss_fn_outputs.add(type_tag="ArrayRecord", num_datums=len(items))
            for name in items[0]:
                arrays = [np.ascontiguousarray(np.asarray(it[name]), dtype=np.float32) for it in items]
                tensor = record.fields[name]
                tensor.data = b"".join(a.tobytes() for a in arrays)
                tensor.offsets = np.concatenate([[0], np.cumsum([a.nbytes for a in arrays])]).astype(np.int64).tobytes()
                tensor.dtype = m.DTYPE_FLOAT32
                tensor.trailing_shape.extend(trailing)
    return out.SerializeToString()


def _tensor_json(array: np.ndarray) -> dict:
    array = np.asarray(array)
    dtype = "int64" if np.issubdtype(array.dtype, np.integer) else "float32"
    return {"data": array.reshape(-1).tolist(), "dtype": dtype, "shape": list(array.shape)}


def forward_output_json(result: dict) -> dict:
    return {
        "loss_fn_output_type": "ArrayRecord",
        "loss_fn_outputs": [{k: _tensor_json(v) for k, v in item.items()} for item in result["loss_outputs"]],
        "metrics": tinker_metrics(result["metrics"]),
    }


def _topk_proto(rows: list, k: int):
    ids = np.zeros((len(rows), k), dtype=np.int32)
    lps = np.full((len(rows), k), -99999.0, dtype=np.float32)
    for i, row in enumerate(rows):
        for j, (token, logprob) in enumerate((row or [])[:k]):
            ids[i, j], lps[i, j] = token, logprob
    return pb().TopkLogprobs(token_ids=ids.tobytes(), logprobs=lps.tobytes(), k=k, length=len(rows))


def _masked_rows(values: list | None, last_n: int | None) -> list | None:
    """prompt_logprobs_last_n: only the last N prompt positions are scored, earlier ones are None."""
    if values is None or last_n is None:
        return values
    cut = max(0, len(values) - last_n)
    return [None] * cut + list(values[cut:])


def _masked_prompt_logprobs(result: dict, last_n: int | None) -> list | None:
    return _masked_rows(result.get("prompt_logprobs"), last_n)


def sample_output_proto(result: dict, *, prompt_logprobs_last_n: int | None = None) -> bytes:
    m = pb()
    out = m.SampleResponse(prompt_cache_hit_tokens=0)
    for seq in result["sequences"]:
        item = out.sequences.add()
        item.stop_reason = m.STOP_REASON_STOP if seq["stop_reason"] == "stop" else m.STOP_REASON_LENGTH
        item.tokens = np.asarray(seq["tokens"], dtype=np.int32).tobytes()
        if seq.get("logprobs") is not None:
            item.logprobs = np.asarray(seq["logprobs"], dtype=np.float32).tobytes()
        if seq.get("topk_logprobs"):
            item.topk_sampled_logprobs.CopyFrom(_topk_proto(seq["topk_logprobs"], len(seq["topk_logprobs"][0])))
    prompt = _masked_prompt_logprobs(result, prompt_logprobs_last_n)
    if prompt is not None:
        out.prompt_logprobs = np.asarray([math.nan if v is None else v for v in prompt], dtype=np.float32).tobytes()
    topk = _masked_rows(result.get("topk_prompt_logprobs"), prompt_logprobs_last_n)
    if topk:
        k = max((len(row) for row in topk if row), default=0)
        if k:
            out.topk_prompt_logprobs.CopyFrom(_topk_proto(topk, k))
    if result.get("target_prompt_logprobs") is not None:
        out.target_prompt_logprobs.CopyFrom(_dense_tensor_proto(result["target_prompt_logprobs"], np.float32))
    if result.get("prompt_alt_tokens") is not None:
        out.prompt_alt_tokens.tokens.CopyFrom(_dense_tensor_proto(result["prompt_alt_tokens"], np.int64))
        out.prompt_alt_tokens.logprobs.CopyFrom(_dense_tensor_proto(result["prompt_alt_logprobs"], np.float32))
    return out.SerializeToString()


def _dense_tensor_proto(rows: list[list], dtype) -> Any:
    """A [rows, k] table as a dense proto Tensor (k = 0 for no rows)."""
    array = np.asarray(rows, dtype=dtype)
    if array.ndim != 2:
        array = array.reshape(len(rows), 0)
    code = pb().DTYPE_INT64 if dtype == np.int64 else pb().DTYPE_FLOAT32
    return pb().Tensor(dense=array.tobytes(), dtype=code, shape=list(array.shape))


def sample_output_json(result: dict, *, prompt_logprobs_last_n: int | None = None) -> dict:
    out: dict[str, Any] = {
        "type": "sample",
        "sequences": [{"stop_reason": s["stop_reason"], "tokens": list(s["tokens"]), "logprobs": list(s["logprobs"])}
                      for s in result["sequences"]],
        "prompt_cache_hit_tokens": 0,
    }
    prompt = _masked_prompt_logprobs(result, prompt_logprobs_last_n)
    if prompt is not None:
        out["prompt_logprobs"] = prompt
    if result.get("topk_prompt_logprobs"):
        out["topk_prompt_logprobs"] = [None if row is None else [list(p) for p in row]
                                       for row in result["topk_prompt_logprobs"]]
    return out
