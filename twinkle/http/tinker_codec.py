"""Translating between the Tinker wire formats and Twinkle's plain-data types.

Protobuf messages come from the schema the installed `tinker` package ships
(`tinker/proto/tinker_public_pb2.py`), loaded by file so that this process does not import the
whole SDK (which pulls in torch). JSON shapes are those of SDK <= 0.24.
"""

from __future__ import annotations

import base64
import binascii
import importlib.util
import math
import sys
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np

from twinkle.config import LimitsConfig
from twinkle.errors import InvalidInputError, UnprocessableError
from twinkle.http.common import body_too_large
from twinkle.types import Datum, ImagePart
from twinkle.vision import FORMATS, PENDING
from twinkle.validation import check_seq_id

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


MAX_TENSOR_DIMS = 4  # loss inputs are (N,) or (N, K); a few more dims still get a clear shape error later
_INT64 = np.iinfo(np.int64)


class ElementBudget:
    """The elements the tensors of one request may take once decoded (`limits.max_tensor_elements`).

    Every declared shape is charged before its array is allocated, sparse tensors by their dense size."""

    def __init__(self, limit: int | None = None) -> None:
        self.limit = limit
        self.used = 0

    def take(self, count: int, field: str) -> None:
        self.used += count
        if self.limit is not None and self.used > self.limit:
            raise InvalidInputError(
                f"the tensors of this request would hold {self.used} elements once decoded, beyond this server's "
                f"limit of {self.limit} (limits.max_tensor_elements); send smaller or fewer tensors", field=field)


def _declared_shape(raw, field: str) -> list[int]:
    if not isinstance(raw, (list, tuple)) or len(raw) > MAX_TENSOR_DIMS or not all(
            isinstance(d, (int, np.integer)) and not isinstance(d, bool) for d in raw):
        raise InvalidInputError(f"shape must be a list of at most {MAX_TENSOR_DIMS} integers, got {raw!r}"[:300],
                                field=field)
    shape = [int(d) for d in raw]
    if any(d < 0 for d in shape):
        raise InvalidInputError(f"shape {shape} has a negative dimension", field=field)
    return shape


def _check_rows(shape: list[int], rows: int | None, field: str, expected: str | None = None) -> None:
    """A loss input's leading dimension is its datum's token count: checked before allocating."""
    if rows is not None and (not shape or shape[0] != rows):
        raise InvalidInputError(expected.format(shape=list(shape)) if expected else
                                f"has shape {tuple(shape)} but the model input has {rows} tokens; expected "
                                f"({rows},) or ({rows}, K)", field=field)


def _elements(shape: list[int]) -> int:
    return math.prod(shape)  # Python ints: a shape like [1, 10**13] cannot overflow


def _np_dtype(code: int, field: str):
    m = pb()
    table = {m.DTYPE_FLOAT32: np.float32, m.DTYPE_INT64: np.int64, m.DTYPE_INT32: np.int32,
             m.DTYPE_BFLOAT16: np.uint16}
    if code not in table:
        raise InvalidInputError(f"unsupported tensor dtype code {code}", field=field)
    return table[code]


def _widen(array: np.ndarray, code: int) -> np.ndarray:
    if code == pb().DTYPE_BFLOAT16:
        return (array.astype(np.uint32) << 16).view(np.float32)
    if array.dtype == np.int32:
        return array.astype(np.int64)
    return array


def _frombuffer(raw: bytes, dtype, field: str, what: str) -> np.ndarray:
    size = np.dtype(dtype).itemsize
    if len(raw) % size:
        raise InvalidInputError(f"{what} has {len(raw)} bytes, not a multiple of the {np.dtype(dtype).name} size "
                                f"({size} bytes)", field=field)
    return np.frombuffer(raw, dtype)


def _dense_from_csr(values: np.ndarray, crow: np.ndarray, col: np.ndarray, shape: list[int], field: str,
                    fill: int | float = 0, budget: ElementBudget | None = None):
    """A CSR tensor as a dense array; the shape is checked (and charged) before anything is allocated."""
    if len(shape) != 2:
        raise InvalidInputError(f"a sparse tensor must be 2-D, got shape {shape}", field=field)
    if values.ndim != 1 or crow.ndim != 1 or col.ndim != 1:
        raise InvalidInputError("sparse values and indices must be flat lists", field=field)
    if len(crow) != shape[0] + 1 or len(col) != len(values):
        raise InvalidInputError(f"malformed sparse tensor (shape {shape}: needs {shape[0] + 1} row offsets and one "
                                f"column index per value; got {len(crow)} and {len(col)} for {len(values)} values)",
                                field=field)
    if crow[0] != 0 or crow[-1] != len(values) or np.any(np.diff(crow) < 0):
        raise InvalidInputError("sparse row offsets must rise from 0 to the number of values", field=field)
    if len(col) and (col.min() < 0 or col.max() >= shape[1]):
        raise InvalidInputError("sparse column index out of range", field=field)
    (budget or ElementBudget()).take(_elements(shape), field)
    out = np.full(shape, fill, dtype=values.dtype)
    out[np.repeat(np.arange(shape[0]), np.diff(crow)), col] = values
    return out


def tensor_from_proto(tensor, field: str, *, rows: int | None = None, budget: ElementBudget | None = None,
                      ) -> np.ndarray:
    """A protobuf Tensor as numpy; `rows`: the leading dimension it must have."""
    dtype = _np_dtype(tensor.dtype, field)
    budget = budget or ElementBudget()
    shape = _declared_shape(list(tensor.shape), field)
    if tensor.WhichOneof("encoding") == "sparse_csr":
        csr = tensor.sparse_csr
        _check_rows(shape, rows, field)
        array = _dense_from_csr(_frombuffer(csr.values, dtype, field, "sparse values"),
                                _frombuffer(csr.crow_indices, np.int64, field, "sparse row offsets"),
                                _frombuffer(csr.col_indices, np.int64, field, "sparse column indices"), shape,
                                field, budget=budget)
    else:
        flat = _frombuffer(tensor.dense, dtype, field, "tensor data")
        shape = shape or [flat.size]
        if _elements(shape) != flat.size:
            raise InvalidInputError(f"declares shape {shape} ({_elements(shape)} elements) but holds {flat.size} "
                                    f"{np.dtype(dtype).name} values", field=field)
        _check_rows(shape, rows, field)
        budget.take(flat.size, field)
        array = flat.reshape(shape).copy()
    return _widen(array, tensor.dtype)


def _image_part(position: int, data: bytes, fmt: str, expected: int | None, field: str, chunk: int) -> ImagePart:
    """An image chunk as it arrives: its placeholders are filled in once the model is known."""
    if fmt not in FORMATS:
        raise InvalidInputError(f"image format {fmt!r} is not supported; send png or jpeg", field=field)
    if expected is not None and not 1 <= expected <= 1 << 20:
        raise InvalidInputError(f"expected_tokens must be a positive token count, got {expected}", field=field)
    return ImagePart(position=position, tokens=expected or 0, data=data, format=fmt, chunk=chunk)


def _assemble(parts: list, images: list[ImagePart]) -> tuple[np.ndarray, list[ImagePart]]:
    return (np.concatenate(parts).astype(np.int64) if parts else np.zeros(0, np.int64)), images


def _tokens_from_chunks(chunks, field: str) -> tuple[np.ndarray, list[ImagePart]]:
    """A protobuf model input's tokens, with a PENDING run standing in for each image chunk."""
    parts, images, length = [], [], 0
    for j, chunk in enumerate(chunks):
        kind = chunk.WhichOneof("chunk")
        where = f"{field}.chunks[{j}]"
        if kind == "image":
            image = chunk.image
            expected = int(image.expected_tokens) if image.HasField("expected_tokens") else None
            images.append(_image_part(length, bytes(image.data), image.format, expected, f"{where} (image)", j))
            parts.append(np.full(expected or 0, PENDING, dtype=np.int64))
        elif kind == "encoded_text":
            parts.append(_frombuffer(chunk.encoded_text.tokens, np.int32, field, "encoded_text tokens"))
        else:
            raise UnprocessableError(f"{kind} inputs are not supported; send encoded_text or image chunks",
                                     field=where)
        length += len(parts[-1])
    return _assemble(parts, images)


def maybe_decompress(body: bytes, content_encoding: str | None, max_bytes: int | None = None) -> bytes:
    """The body as sent, or decompressed (zstd) in one streaming pass that stops past `max_bytes` (413)."""
    encoding = (content_encoding or "").strip().lower()
    if encoding in ("", "identity"):
        return body
    if encoding != "zstd":
        raise InvalidInputError(f"unsupported Content-Encoding {content_encoding!r}; send zstd or none",
                                field="content-encoding")
    import zstandard

    limit = max_bytes if max_bytes is not None else LimitsConfig().max_body_bytes
    window = min(1 << 27, max(1 << 20, limit))  # the decoder's window buffer is bounded too
    chunks, size = [], 0
    try:
        reader = zstandard.ZstdDecompressor(max_window_size=window).stream_reader(body, read_across_frames=True)
        while True:
            chunk = reader.read(min(1 << 20, limit + 1 - size))
            if not chunk:
                break
            size += len(chunk)
            if size > limit:
                raise body_too_large(f"more than {limit}", limit, "decompressed request body")
            chunks.append(chunk)
    except zstandard.ZstdError as exc:
        raise InvalidInputError(f"body is not valid zstd: {exc}", field="body") from None
    return b"".join(chunks)


def decode_forward_backward_proto(body: bytes, content_encoding: str | None = None, *,
                                  max_bytes: int | None = None):
    """The ForwardBackwardRequest message of a (possibly zstd-compressed) body; tensors not decoded yet."""
    body = maybe_decompress(body, content_encoding, max_bytes)
    request = pb().ForwardBackwardRequest()
    try:
        request.ParseFromString(body)
    except Exception:
        raise InvalidInputError("body is not a valid ForwardBackwardRequest protobuf message", field="body") from None
    return request


def forward_backward_from_proto(request, *, max_elements: int | None = None) -> dict:
    """A decoded ForwardBackwardRequest as plain data (datums as `Datum`), within `max_elements`."""
    seq_id = check_seq_id(int(request.seq_id))
    config: dict[str, Any] = {k: float(v) for k, v in request.loss_fn_config.items()}
    for key, value in request.loss_fn_config_v2.items():
        config[key] = value.number if value.WhichOneof("value") == "number" else value.text
    budget = ElementBudget(max_elements)
    data = []
    for i, datum in enumerate(request.data):
        tokens, images = _tokens_from_chunks(datum.model_input, f"data[{i}].model_input")
        budget.take(tokens.size, f"data[{i}].model_input")
        rows = None if any(not image.tokens for image in images) else len(tokens)  # counted once the model is known
        inputs = {k: tensor_from_proto(v, f"data[{i}].loss_fn_inputs.{k}", rows=rows, budget=budget)
                  for k, v in datum.loss_fn_inputs.items()}
        data.append(Datum(input_tokens=tokens, loss_inputs=inputs, images=images))
    return {"model_id": request.model_id, "seq_id": seq_id, "loss_fn": request.loss_fn,
            "loss_fn_config": config or None, "forward_only": bool(request.forward_only), "data": data}


def parse_forward_backward_proto(body: bytes, content_encoding: str | None = None, *, max_bytes: int | None = None,
                                 max_elements: int | None = None) -> dict:
    """Decode a protobuf ForwardBackwardRequest into plain data (datums as `Datum`)."""
    return forward_backward_from_proto(decode_forward_backward_proto(body, content_encoding, max_bytes=max_bytes),
                                       max_elements=max_elements)


def _json_numbers(raw: Any, dtype, field: str, what: str = "data") -> np.ndarray:
    """A JSON list of numbers as a numpy array of `dtype` (int64 values must be integers that fit)."""
    if not isinstance(raw, list):
        raise InvalidInputError(f"{what} must be a list of numbers", field=field)
    try:
        values = np.asarray(raw)
    except (TypeError, ValueError, OverflowError) as exc:
        raise InvalidInputError(f"{what} is not a rectangular list of numbers: {exc}", field=field) from None
    if values.size == 0:
        return values.astype(dtype if dtype is not None else np.float32)
    if values.dtype.kind not in "biuf":  # strings, None, or integers beyond 64 bits (numpy keeps them as objects)
        raise InvalidInputError(f"{what} must hold numbers (integers within int64), got {values.dtype} values",
                                field=field)
    if dtype is None:
        return values
    if np.dtype(dtype).kind == "i":
        if values.dtype.kind == "f" and not (np.all(np.isfinite(values)) and np.all(values == np.round(values))):
            raise InvalidInputError(f"{what} must hold integers for dtype int64", field=field)
        if (values.dtype.kind == "f" and (values.max() >= 2.0**63 or values.min() < -2.0**63)
                or values.dtype.kind == "u" and values.max() > _INT64.max):
            raise InvalidInputError(f"{what} holds integers that do not fit int64", field=field)
    return values.astype(dtype)


def tensor_from_json(obj: Any, field: str, *, sparse_fill: int | float = 0, rows: int | None = None,
                     budget: ElementBudget | None = None, expected: str | None = None) -> np.ndarray:
    """A JSON TensorData {data, dtype, shape, sparse_*}; plain lists are accepted too.

    A sparse tensor's unlisted cells become `sparse_fill`; `rows` is the leading dimension it must have
    (`expected`: the message when it has not, with `{shape}` for the shape it has).
    """
    budget = budget or ElementBudget()
    if isinstance(obj, list):
        array = _json_numbers(obj, None, field)
        _check_rows(list(array.shape), rows, field, expected)
        budget.take(array.size, field)
        return array
    if not isinstance(obj, dict) or "data" not in obj:
        raise InvalidInputError("expected a tensor {data, dtype, shape}", field=field)
    dtype = {"int64": np.int64, "float32": np.float32}.get(obj.get("dtype", "float32"))
    if dtype is None:
        raise InvalidInputError(f"unsupported dtype {obj.get('dtype')!r}"[:200], field=field)
    values = _json_numbers(obj["data"], dtype, field)
    shape = obj.get("shape")
    shape = None if shape is None else _declared_shape(shape, field)
    if obj.get("sparse_crow_indices") is not None:
        crow = _json_numbers(obj["sparse_crow_indices"], np.int64, field, "sparse_crow_indices")
        col = _json_numbers(obj.get("sparse_col_indices"), np.int64, field, "sparse_col_indices")
        shape = shape or []
        _check_rows(shape, rows, field, expected)
        return _dense_from_csr(values, crow, col, shape, field, fill=sparse_fill, budget=budget)
    values = values.reshape(-1)
    shape = shape or [values.size]
    if _elements(shape) != values.size:
        raise InvalidInputError(f"declares shape {shape} ({_elements(shape)} elements) but holds {values.size} values",
                                field=field)
    _check_rows(shape, rows, field)
    budget.take(values.size, field)
    return values.reshape(shape)


def tokens_from_json_chunks(model_input: Any, field: str) -> tuple[np.ndarray, list[ImagePart]]:
    """A JSON model input's tokens, with a PENDING run standing in for each image chunk (base64 data)."""
    if not isinstance(model_input, dict) or not isinstance(model_input.get("chunks"), list):
        raise InvalidInputError("expected {chunks: [...]}", field=field)
    parts, images, length = [], [], 0
    for j, chunk in enumerate(model_input["chunks"]):
        if not isinstance(chunk, dict):
            raise InvalidInputError("chunks must be objects", field=f"{field}.chunks[{j}]")
        kind = chunk.get("type", "encoded_text")
        if kind == "image":
            parts.append(_json_image(chunk, length, images, f"{field}.chunks[{j}] (image)", j))
            length += len(parts[-1])
            continue
        if kind != "encoded_text":
            raise UnprocessableError(f"{kind} inputs are not supported; send encoded_text or image chunks"[:200],
                                     field=f"{field}.chunks[{j}]")
        tokens = chunk.get("tokens")
        if not isinstance(tokens, list) or not all(isinstance(t, int) and not isinstance(t, bool) for t in tokens):
            raise InvalidInputError("tokens must be a list of integers", field=f"{field}.chunks[{j}].tokens")
        try:
            parts.append(np.asarray(tokens, dtype=np.int64))
        except OverflowError:
            raise InvalidInputError("holds a token id that does not fit int64 (token ids are below the vocabulary "
                                    "size)", field=f"{field}.chunks[{j}].tokens") from None
        length += len(parts[-1])
    return _assemble(parts, images)


def _json_image(chunk: dict, position: int, images: list[ImagePart], where: str, index: int) -> np.ndarray:
    raw, fmt, expected = chunk.get("data"), chunk.get("format"), chunk.get("expected_tokens")
    if not isinstance(raw, str):
        raise InvalidInputError("data must be the image's bytes as a base64 string", field=where)
    if expected is not None and (isinstance(expected, bool) or not isinstance(expected, int)):
        raise InvalidInputError("expected_tokens must be an integer", field=where)
    try:
        data = base64.b64decode(raw, validate=True)
    except (binascii.Error, ValueError):
        raise InvalidInputError("data is not valid base64", field=where) from None
    images.append(_image_part(position, data, fmt, expected, where, index))
    return np.full(expected or 0, PENDING, dtype=np.int64)


def _optional_str(value: Any, field: str) -> str | None:
    if value is not None and not isinstance(value, str):
        raise InvalidInputError(f"must be a string, got {type(value).__name__}", field=field)
    return value


def parse_forward_backward_json(body: dict, key: str, *, max_elements: int | None = None) -> dict:
    """SDK <= 0.24 JSON: {forward_backward_input|forward_input: {data, loss_fn, loss_fn_config}, model_id, seq_id}."""
    model_id = _optional_str(body.get("model_id"), "model_id")
    seq_id = check_seq_id(body.get("seq_id"))
    inner = body.get(key)
    if not isinstance(inner, dict) or not isinstance(inner.get("data"), list):
        raise InvalidInputError(f"missing {key}.data", field=key)
    loss_fn = _optional_str(inner.get("loss_fn"), "loss_fn")
    loss_config = inner.get("loss_fn_config")
    if loss_config is not None and not isinstance(loss_config, dict):
        raise InvalidInputError("must be an object", field="loss_fn_config")
    budget = ElementBudget(max_elements)
    data = []
    for i, datum in enumerate(inner["data"]):
        if not isinstance(datum, dict):
            raise InvalidInputError("datums must be objects", field=f"data[{i}]")
        tokens, images = tokens_from_json_chunks(datum.get("model_input"), f"data[{i}].model_input")
        budget.take(tokens.size, f"data[{i}].model_input")
        raw_inputs = datum.get("loss_fn_inputs") or {}
        if not isinstance(raw_inputs, dict):
            raise InvalidInputError("must be an object", field=f"data[{i}].loss_fn_inputs")
        rows = None if any(not image.tokens for image in images) else len(tokens)  # counted once the model is known
        inputs = {k: tensor_from_json(v, f"data[{i}].loss_fn_inputs.{k}", rows=rows, budget=budget)
                  for k, v in raw_inputs.items()}
        data.append(Datum(input_tokens=tokens, loss_inputs=inputs, images=images))
    return {"model_id": model_id, "seq_id": seq_id, "loss_fn": loss_fn, "loss_fn_config": loss_config,
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
