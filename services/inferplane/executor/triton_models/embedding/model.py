"""Triton Python-backend model: a sentence embedder (BERT encoder, pooling, L2 normalisation), dynamically batched.

The network is ``inferplane.modeling.bert`` (copied beside this file by the repository renderer); the tensors
are ``inferplane.modeling.contract.Embedding``'s: ``input_ids`` [n, S] with an optional ``attention_mask`` of
the same shape in, ``embedding`` [n, dim] out. A request with S > max_position_embeddings (512), S = 0, ids
outside the vocabulary or a bad mask gets an INVALID_ARG error; the other requests of its batch are served.

Triton's dynamic batcher (``allow_ragged_batch`` on the inputs, so texts of different lengths batch
together) hands ``execute`` several requests; ``SentenceEmbedder.embed`` sorts their rows by length and
right-pads them into as few forwards as keep padding within ``PAD_SLACK`` (usually one or two).

Imports: ``inferplane.modeling``, torch, numpy and ``triton_python_backend_utils`` only.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
import triton_python_backend_utils as pb_utils

from inferplane.modeling import bert
from inferplane.modeling.bert import SentenceEmbedder
from inferplane.modeling.contract import CHECKPOINT_DIR, DTYPE, INVALID_ARG, TORCH_THREADS, Embedding
from inferplane.modeling.instance import instance_device, int_param, param

INPUT_IDS, ATTENTION_MASK, EMBEDDING = Embedding.INPUT_IDS.name, Embedding.ATTENTION_MASK.name, Embedding.EMBEDDING.name


class RequestError(ValueError):
    """A request the model refuses; answered with INVALID_ARG."""


class TritonPythonModel:
    def initialize(self, args: dict[str, Any]) -> None:
        config = json.loads(args["model_config"])
        self.name = args.get("model_name", "embedding")
        if pb_utils.using_decoupled_model_transaction_policy(config):
            raise pb_utils.TritonModelException(f"{self.name}: an embedding model answers once; not decoupled")
        checkpoint = param(config, CHECKPOINT_DIR)
        if not checkpoint:
            raise pb_utils.TritonModelException(f"{self.name}: parameter {CHECKPOINT_DIR} is not set")
        self.checkpoint_dir = Path(checkpoint)
        device = instance_device(args, int_param(config, TORCH_THREADS, 0))
        # fp32 everywhere by default: the vectors are compared with cosine similarity across runs and stores.
        started = time.monotonic()
        self.embedder = SentenceEmbedder(self.checkpoint_dir, device=device, dtype=param(config, DTYPE) or "float32")
        pooling = self.embedder.pooling
        self.log(f"ready in {time.monotonic() - started:.1f}s on {device} ({torch.get_num_threads()} threads): "
                 f"{self.checkpoint_dir.name}, pooling {'+'.join(pooling.modes)}, normalize {pooling.normalize}, "
                 f"max_batch_size {config.get('max_batch_size')}, model code {Path(bert.__file__).parent}")

    def log(self, message: str) -> None:
        pb_utils.Logger.log_info(f"[{self.name}] {message}")

    def execute(self, requests: list[Any]) -> list[Any]:
        responses: list[Any] = [None] * len(requests)
        parsed: list[tuple[int, np.ndarray, np.ndarray]] = []  # (request index, ids [n, S], mask [n, S])
        for i, request in enumerate(requests):
            try:
                ids, mask = self._parse(request)
                parsed.append((i, ids, mask))
            except RequestError as e:
                error = pb_utils.TritonError(str(e), getattr(pb_utils.TritonError, INVALID_ARG))
                responses[i] = pb_utils.InferenceResponse(error=error)
        if parsed:
            rows = [(ids[r], mask[r]) for _, ids, mask in parsed for r in range(ids.shape[0])]
            embeddings = self.embedder.embed(rows)  # [rows, dim]
            start = 0
            for i, ids, _ in parsed:
                out = embeddings[start : start + ids.shape[0]]
                start += ids.shape[0]
                responses[i] = pb_utils.InferenceResponse(output_tensors=[pb_utils.Tensor(EMBEDDING, out)])
        return responses

    def _parse(self, request: Any) -> tuple[np.ndarray, np.ndarray]:
        ids = pb_utils.get_input_tensor_by_name(request, INPUT_IDS).as_numpy()
        if ids.ndim == 1:
            ids = ids[None]
        if ids.ndim != 2 or ids.shape[1] == 0:
            raise RequestError(f"input_ids must hold one non-empty sequence per row, got shape {list(ids.shape)}")
        max_len, vocab = self.embedder.max_len, self.embedder.vocab
        if ids.shape[1] > max_len:
            raise RequestError(f"a sequence of {ids.shape[1]} tokens exceeds max_position_embeddings ({max_len})")
        if ids.min() < 0 or ids.max() >= vocab:
            raise RequestError(f"input_ids must be in [0, {vocab})")
        tensor = pb_utils.get_input_tensor_by_name(request, ATTENTION_MASK)
        if tensor is None:
            return ids, np.ones_like(ids)
        mask = tensor.as_numpy()
        if mask.size != ids.size:
            raise RequestError(f"attention_mask must have the shape of input_ids {list(ids.shape)}")
        mask = mask.reshape(ids.shape)
        if not np.isin(mask, (0, 1)).all() or not mask.any(axis=1).all():
            raise RequestError("attention_mask must be 0 or 1, with at least one 1 per row")
        return ids, mask

    def finalize(self) -> None:
        self.log("unloading")
        del self.embedder
