"""Triton Python-backend model: a decoupled, token-streaming Llama (``services.executor.llama``).

Contract (the executor depends on it):
- inputs: ``input_ids`` INT64 [-1]; ``max_tokens`` INT32 [1]; optional ``temperature`` FP32 [1] (0 = greedy),
  ``top_p`` FP32 [1], ``top_k`` INT32 [1] (0 = off), ``seed`` INT64 [1] (absent = random),
  ``stop_token_ids`` INT64 [-1] (added to the checkpoint's eos ids).
- one response per produced token: ``token_ids`` [1 id] and ``logprobs`` [1] (the model's log-probability).
  A stop token ends the stream and is not sent, but counts in ``completion_tokens``.
- then exactly one response flagged ``TRITONSERVER_RESPONSE_COMPLETE_FINAL`` with ``token_ids`` and
  ``logprobs`` empty, ``finish_reason`` ("stop" | "length" | "cancelled"), ``prompt_tokens`` and
  ``completion_tokens``. "length" covers both max_tokens and the context end (prompt + completion =
  max_context).
- a bad request gets a single final response carrying a ``TritonError`` (INVALID_ARG).

Requests are served one after another (continuous batching is later work). The package
``services.executor.llama`` must be importable by the stub's Python (the project installed in the
environment whose ``python3`` leads tritonserver's PATH, or the repository on PYTHONPATH).
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import triton_python_backend_utils as pb_utils

from services.executor.llama import Generation, LlamaForCausalLM, SamplingParams, generate, load_model


class RequestError(ValueError):
    """A request the model refuses; answered with INVALID_ARG."""


@dataclass(frozen=True)
class Request:
    input_ids: list[int]
    max_tokens: int
    sampling: SamplingParams
    stop_ids: frozenset[int]


def _error_code(name: str) -> Any:
    return getattr(pb_utils.TritonError, name, None)


def _triton_error(message: str, code: str) -> Any:
    c = _error_code(code)
    return pb_utils.TritonError(message) if c is None else pb_utils.TritonError(message, c)


def _param(config: dict[str, Any], key: str, default: str = "") -> str:
    value = config.get("parameters", {}).get(key, {}).get("string_value", default)
    return default if value.startswith("${") else value  # an unrendered placeholder counts as unset


def _checkpoint_eos_ids(checkpoint_dir: Path, model: LlamaForCausalLM) -> frozenset[int]:
    ids = set(model.config.eos_token_ids)
    gen_cfg = checkpoint_dir / "generation_config.json"
    if gen_cfg.exists():
        eos = json.loads(gen_cfg.read_text()).get("eos_token_id")
        ids |= set([eos] if isinstance(eos, int) else eos or [])
    return frozenset(ids)


def _scalar(request: Any, name: str) -> Any | None:
    tensor = pb_utils.get_input_tensor_by_name(request, name)
    if tensor is None:
        return None
    arr = tensor.as_numpy().reshape(-1)
    if arr.size != 1:
        raise RequestError(f"{name} must hold exactly one value, got {arr.size}")
    return arr[0].item()


def _array(request: Any, name: str) -> list[int] | None:
    tensor = pb_utils.get_input_tensor_by_name(request, name)
    return None if tensor is None else [int(x) for x in tensor.as_numpy().reshape(-1)]


class TritonPythonModel:
    def initialize(self, args: dict[str, Any]) -> None:
        config = json.loads(args["model_config"])
        self.name = args.get("model_name", "llm")
        if not pb_utils.using_decoupled_model_transaction_policy(config):
            raise pb_utils.TritonModelException(
                f"{self.name}: this model streams tokens and needs model_transaction_policy {{ decoupled: true }}"
            )
        checkpoint = _param(config, "checkpoint_dir")
        if not checkpoint:
            raise pb_utils.TritonModelException(f"{self.name}: parameter checkpoint_dir is not set")
        self.checkpoint_dir = Path(checkpoint)

        threads = int(_param(config, "torch_threads", "0") or 0)
        if threads > 0:
            torch.set_num_threads(threads)
        if args.get("model_instance_kind") == "GPU":
            device = torch.device(f"cuda:{int(args.get('model_instance_device_id', 0))}")
        else:
            device = torch.device("cpu")
        # bf16 on GPUs; fp32 on CPUs, where bf16 matmuls are slow without AMX/AVX-512.
        dtype = _param(config, "dtype") or ("bfloat16" if device.type == "cuda" else "float32")

        self.log(f"loading {self.checkpoint_dir} on {device} as {dtype} ({torch.get_num_threads()} threads)")
        started = time.monotonic()

        def progress(i: int, n: int, shard: str, elapsed: float) -> None:
            self.log(f"loaded shard {i}/{n} {shard} ({elapsed:.1f}s)")

        self.model = load_model(self.checkpoint_dir, dtype=dtype, device=device, progress=progress)
        self.eos_ids = _checkpoint_eos_ids(self.checkpoint_dir, self.model)
        max_pos = self.model.config.max_position_embeddings
        self.max_context = min(int(_param(config, "max_context", "0") or 0) or max_pos, max_pos)
        self.log(
            f"ready in {time.monotonic() - started:.1f}s: {self.model.config.num_hidden_layers} layers, "
            f"vocab {self.model.config.vocab_size}, max_context {self.max_context}, eos {sorted(self.eos_ids)}"
        )

    def log(self, message: str) -> None:
        pb_utils.Logger.log_info(f"[{self.name}] {message}")

    def execute(self, requests: list[Any]) -> None:
        for request in requests:
            self._serve(request)
        return None  # decoupled: every answer went through the response senders

    def _serve(self, request: Any) -> None:
        sender = request.get_response_sender()
        try:
            req = self._parse(request)
        except RequestError as e:
            self._send_final(sender, pb_utils.InferenceResponse(error=_triton_error(str(e), "INVALID_ARG")))
            return
        started = time.monotonic()
        gen = generate(
            self.model, req.input_ids, max_tokens=req.max_tokens, sampling=req.sampling, stop_ids=req.stop_ids,
            max_context=self.max_context, is_cancelled=request.is_cancelled,
        )
        try:
            for step in gen:
                sender.send(pb_utils.InferenceResponse(output_tensors=[
                    pb_utils.Tensor("token_ids", np.array([step.token_id], dtype=np.int64)),
                    pb_utils.Tensor("logprobs", np.array([step.logprob], dtype=np.float32)),
                ]))
        except Exception as e:  # the stream must still end with a final response
            if not request.is_cancelled():
                self.log(f"generation failed: {e!r}")
                self._send_final(sender, pb_utils.InferenceResponse(error=_triton_error(repr(e), "INTERNAL")))
                return
            gen.finish_reason = "cancelled"  # a send raced the client's cancel
        self._send_final(sender, self._final_response(gen))
        elapsed = time.monotonic() - started
        self.log(
            f"finish={gen.finish_reason} prompt_tokens={gen.prompt_tokens} "
            f"completion_tokens={gen.completion_tokens} ({gen.completion_tokens / max(elapsed, 1e-9):.1f} tok/s)"
        )

    def _parse(self, request: Any) -> Request:
        input_ids = _array(request, "input_ids") or []
        if not input_ids:
            raise RequestError("input_ids must not be empty")
        vocab = self.model.config.vocab_size
        if min(input_ids) < 0 or max(input_ids) >= vocab:
            raise RequestError(f"input_ids must be in [0, {vocab})")
        if len(input_ids) >= self.max_context:
            raise RequestError(
                f"prompt of {len(input_ids)} tokens does not fit the context of {self.max_context} tokens "
                "(at least one token must remain for the completion)"
            )
        max_tokens = _scalar(request, "max_tokens")
        if max_tokens is None or max_tokens < 1:
            raise RequestError(f"max_tokens must be >= 1, got {max_tokens}")
        temperature = _scalar(request, "temperature")
        temperature = 0.0 if temperature is None else float(temperature)
        if not temperature >= 0:  # also refuses NaN
            raise RequestError(f"temperature must be >= 0, got {temperature}")
        top_p = _scalar(request, "top_p")
        top_p = 1.0 if top_p is None else float(top_p)
        if not 0 < top_p <= 1:
            raise RequestError(f"top_p must be in (0, 1], got {top_p}")
        top_k = _scalar(request, "top_k")
        top_k = 0 if top_k is None else int(top_k)
        if top_k < 0:
            raise RequestError(f"top_k must be >= 0, got {top_k}")
        seed = _scalar(request, "seed")
        stop_ids = self.eos_ids | frozenset(_array(request, "stop_token_ids") or [])
        sampling = SamplingParams(
            temperature=temperature, top_k=top_k, top_p=top_p, seed=None if seed is None else int(seed)
        )
        return Request(input_ids, int(max_tokens), sampling, stop_ids)

    @staticmethod
    def _final_response(gen: Generation) -> Any:
        return pb_utils.InferenceResponse(output_tensors=[
            pb_utils.Tensor("token_ids", np.zeros([0], dtype=np.int64)),
            pb_utils.Tensor("logprobs", np.zeros([0], dtype=np.float32)),
            pb_utils.Tensor("finish_reason", np.array([str(gen.finish_reason).encode()], dtype=np.object_)),
            pb_utils.Tensor("prompt_tokens", np.array([gen.prompt_tokens], dtype=np.int32)),
            pb_utils.Tensor("completion_tokens", np.array([gen.completion_tokens], dtype=np.int32)),
        ])

    def _send_final(self, sender: Any, response: Any) -> None:
        try:
            sender.send(response, flags=pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL)
        except Exception as e:  # e.g. the client has gone; nothing is left to tell it
            self.log(f"could not send the final response: {e!r}")

    def finalize(self) -> None:
        self.log("unloading")
        del self.model
