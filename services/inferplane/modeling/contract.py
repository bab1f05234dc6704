"""The contract between the Triton models and their caller, written once: tensors, parameters, error codes.

The Triton models (``inferplane/executor/triton_models/<kind>/model.py``) read and write these tensors, the
repository renderer (``inferplane/executor/repository.py``) writes them into each ``config.pbtxt``, and the
executor's client (``inferplane/executor/triton_client.py``) builds and parses them. Standard library only: the
executor imports this module without torch, and the renderer copies it beside each model.py.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Final

# KServe v2 datatype -> numpy dtype of its raw little-endian contents (BYTES: 4-byte length + bytes per item)
NUMPY_DTYPES: Final = {"INT64": "<i8", "UINT64": "<u8", "INT32": "<i4", "FP32": "<f4", "BYTES": "object"}


@dataclass(frozen=True, slots=True)
class TensorSpec:
    """One input or output tensor of a model, as config.pbtxt declares it."""

    name: str
    datatype: str  # KServe v2 datatype on the wire: INT64, INT32, FP32, BYTES
    dims: tuple[int, ...]  # config.pbtxt dims without the batch dimension; -1 = any length
    optional: bool = False  # an input the request may leave out
    ragged: bool = False  # allow_ragged_batch: requests of different lengths share a dynamic batch

    def __post_init__(self) -> None:
        assert self.datatype in NUMPY_DTYPES, f"{self.name}: unknown datatype {self.datatype}"

    @property
    def numpy_dtype(self) -> str:
        return NUMPY_DTYPES[self.datatype]

    @property
    def config_type(self) -> str:
        """config.pbtxt's ``data_type`` (Triton calls BYTES ``TYPE_STRING`` there)."""
        return "TYPE_STRING" if self.datatype == "BYTES" else f"TYPE_{self.datatype}"


# --- config.pbtxt parameters (``parameters { key: ... string_value: ... }``), read in initialize -------------

CHECKPOINT_DIR: Final = "checkpoint_dir"  # absolute path of the checkpoint folder
TORCH_THREADS: Final = "torch_threads"  # torch intra-op threads in the model's process; 0 = torch's default
DTYPE: Final = "dtype"  # float32 | float16 | bfloat16; optional (LLM: bfloat16 on GPUs, float32 on CPUs)


# --- TritonError codes the models answer with (``pb_utils.TritonError.<code>``, all in Triton 2.51) ---------
# Triton's gRPC frontend sends each as the status of the same meaning (INVALID_ARG -> INVALID_ARGUMENT); on a
# stream it does so only when the stream was opened with the header STREAM_ERRORS_AS_STATUS.

INVALID_ARG: Final = "INVALID_ARG"  # the request is wrong; the model serves on
INTERNAL: Final = "INTERNAL"  # the model failed on it (a broken step); it has reset itself and serves on
UNAVAILABLE: Final = "UNAVAILABLE"  # channel mode: an open for a channel this model instance does not hold
STREAM_ERRORS_AS_STATUS: Final = ("triton_grpc_error", "true")  # gRPC metadata of a ModelStreamInfer call


class LLM:
    """The decoupled token-streaming LLM (``triton_models/llm``).

    One request per stream: token responses (``TOKEN_IDS`` n >= 1, ``LOGPROBS`` n) as tokens are produced, then
    one response flagged final with both empty and ``FINISH_REASON``, ``PROMPT_TOKENS``, ``COMPLETION_TOKENS``,
    ``CACHED_TOKENS``.
    A refused request gets a single final error response (INVALID_ARG) instead.
    """

    # Required by a generation. config.pbtxt declares every input optional (``repository.LLM_INPUTS``): the channel
    # mode's attach and cancel requests carry neither of these, and the model refuses a generation without them.
    INPUT_IDS: Final = TensorSpec("input_ids", "INT64", (-1,))
    MAX_TOKENS: Final = TensorSpec("max_tokens", "INT32", (1,))
    TEMPERATURE: Final = TensorSpec("temperature", "FP32", (1,), optional=True)  # 0 or absent = greedy
    TOP_P: Final = TensorSpec("top_p", "FP32", (1,), optional=True)  # (0, 1]; absent = 1
    TOP_K: Final = TensorSpec("top_k", "INT32", (1,), optional=True)  # 0 or absent = off
    SEED: Final = TensorSpec("seed", "INT64", (1,), optional=True)  # absent = random
    STOP_TOKEN_IDS: Final = TensorSpec("stop_token_ids", "INT64", (-1,), optional=True)  # added to the eos ids
    REPETITION_PENALTY: Final = TensorSpec("repetition_penalty", "FP32", (1,), optional=True)  # > 0; 1 = off
    PRESENCE_PENALTY: Final = TensorSpec("presence_penalty", "FP32", (1,), optional=True)  # [-2, 2]; 0 = off
    FREQUENCY_PENALTY: Final = TensorSpec("frequency_penalty", "FP32", (1,), optional=True)  # [-2, 2]; 0 = off
    MIN_TOKENS: Final = TensorSpec("min_tokens", "INT32", (1,), optional=True)  # no stop before this many
    IGNORE_EOS: Final = TensorSpec("ignore_eos", "INT32", (1,), optional=True)  # 1: the eos ids do not stop
    LOGIT_BIAS_IDS: Final = TensorSpec("logit_bias_ids", "INT64", (-1,), optional=True)  # with LOGIT_BIAS
    LOGIT_BIAS: Final = TensorSpec("logit_bias", "FP32", (-1,), optional=True)  # added to those ids' logits
    TOP_LOGPROBS: Final = TensorSpec("top_logprobs", "INT32", (1,), optional=True)  # k alternatives per token
    # The grammar the text must follow, JSON: {"json_object": true} | {"json_schema": "<schema text>"} |
    # {"regex": "..."} | {"lark": "..."} (``inferplane.modeling.constrained``); absent: free.
    CONSTRAINT: Final = TensorSpec("constraint", "BYTES", (1,), optional=True)
    INPUTS: Final = (INPUT_IDS, MAX_TOKENS, TEMPERATURE, TOP_P, TOP_K, SEED, STOP_TOKEN_IDS, REPETITION_PENALTY,
                     PRESENCE_PENALTY, FREQUENCY_PENALTY, MIN_TOKENS, IGNORE_EOS, LOGIT_BIAS_IDS, LOGIT_BIAS,
                     TOP_LOGPROBS, CONSTRAINT)

    TOKEN_IDS: Final = TensorSpec("token_ids", "INT64", (-1,))
    LOGPROBS: Final = TensorSpec("logprobs", "FP32", (-1,))  # the model's log-probability of each token
    FINISH_REASON: Final = TensorSpec("finish_reason", "BYTES", (1,))  # one of FINISH_REASONS, UTF-8
    PROMPT_TOKENS: Final = TensorSpec("prompt_tokens", "INT32", (1,))
    COMPLETION_TOKENS: Final = TensorSpec("completion_tokens", "INT32", (1,))  # stop tokens included
    # Of PROMPT_TOKENS, those whose keys and values were reused from the prefix cache (not computed)
    CACHED_TOKENS: Final = TensorSpec("cached_tokens", "INT32", (1,))
    # With TOP_LOGPROBS k: k candidate ids per token of TOKEN_IDS (most likely first), and their log-probabilities
    TOP_TOKEN_IDS: Final = TensorSpec("top_token_ids", "INT64", (-1,))
    TOP_LOGPROB_VALUES: Final = TensorSpec("top_logprob_values", "FP32", (-1,))
    OUTPUTS: Final = (TOKEN_IDS, LOGPROBS, FINISH_REASON, PROMPT_TOKENS, COMPLETION_TOKENS, TOP_TOKEN_IDS,
                      TOP_LOGPROB_VALUES, CACHED_TOKENS)
    MAX_TOP_LOGPROBS: Final = 20

    # "length": max_tokens or the context's end; "cancelled": the client left or the model unloaded
    FINISH_REASONS: Final = ("stop", "length", "cancelled")

    MAX_CONTEXT: Final = "max_context"  # parameter: prompt + completion limit; 0 = max_position_embeddings
    MAX_SEQUENCES: Final = "max_sequences"  # parameter: sequences decoded together (KV-cache slots); 0 = 32
    IPC_DUTY: Final = "ipc_duty"  # parameter, optional: the IPC thread's busy fraction before tokens coalesce
    # parameters, optional: the prefix cache's budget in blocks (0 or absent: no prefix cache) and its block size in
    # tokens (absent: 16); docs/prefix-cache.md
    PREFIX_CACHE_BLOCKS: Final = "prefix_cache_blocks"
    PREFIX_BLOCK_SIZE: Final = "prefix_block_size"
    PARAMETERS: Final = (CHECKPOINT_DIR, TORCH_THREADS, MAX_CONTEXT, MAX_SEQUENCES, DTYPE, IPC_DUTY,
                         PREFIX_CACHE_BLOCKS, PREFIX_BLOCK_SIZE)


class LLMChannel:
    """Channel (step) mode of the token models: many sequences on one ``ModelStreamInfer`` stream, one response per
    round of the model's IPC thread carrying every sequence that has news (``inferplane.modeling.channel``).

    Requests, each a Triton request on the client's one stream, told apart by their inputs:
    - attach: ``CHANNEL`` alone. Stays open; its responses are the channel's frames. It ends (final flag) when the
      client cancels it or the model unloads; a cancelled attach cancels every sequence of the channel.
    - open: ``CHANNEL``, ``SEQ`` and a generation's ``LLM.INPUTS``. Completed at once with an empty final
      response (which Triton forwards only to a client that asked for empty final responses). A generation the
      model refuses is a failed sequence (INVALID_ARG) in the next frame; an open the channel cannot take (a
      channel this instance does not hold: UNAVAILABLE; a sequence number in use: INVALID_ARG) is the open
      request's own TritonError.
    - cancel: ``CHANNEL`` and ``CANCEL``: those of the channel's sequences still live end "cancelled"; completed at
      once like an open.
    Frame columns (outputs of the attach's responses), each group absent when empty:
    - ``SEQS`` [n], ``COUNTS`` [n]; ``LLM.TOKEN_IDS``/``LLM.LOGPROBS`` [sum(COUNTS)]: the new tokens, in SEQS order;
      ``TOP_COUNTS`` [n] with ``LLM.TOP_TOKEN_IDS``/``LLM.TOP_LOGPROB_VALUES`` [sum(COUNTS * TOP_COUNTS)] when a
      sequence of the frame asked for top log-probabilities;
    - ``ENDED`` [e], ``ENDED_REASONS`` [e] (``LLM.FINISH_REASONS``), ``ENDED_PROMPT_TOKENS`` [e],
      ``ENDED_COMPLETION_TOKENS`` [e], ``ENDED_CACHED_TOKENS`` [e]: the sequences that finished (after their last
      tokens in the same frame);
    - ``FAILED`` [f], ``FAILED_CODES`` [f] (the TritonError code names above), ``FAILED_MESSAGES`` [f];
    - a model with a prefix cache: ``BLOCKS_STORED`` [s] and ``BLOCKS_REMOVED`` [r], the hashes
      (``inferplane.modeling.blocks``) of the blocks its cache gained and lost since the channel's previous frame
      (disjoint); with ``BLOCKS_RESET`` [1] (= 1), ``BLOCKS_STORED`` is every block it holds now (the first frame
      of an attach, and after the cache was emptied) and ``BLOCKS_REMOVED`` is absent.
    """

    CHANNEL: Final = TensorSpec("channel", "BYTES", (1,), optional=True)  # the client's channel id, UTF-8
    SEQ: Final = TensorSpec("seq", "INT64", (1,), optional=True)  # an open's sequence number in its channel
    CANCEL: Final = TensorSpec("cancel_seqs", "INT64", (-1,), optional=True)  # a cancel's sequence numbers
    INPUTS: Final = (CHANNEL, SEQ, CANCEL)

    SEQS: Final = TensorSpec("seqs", "INT64", (-1,))
    COUNTS: Final = TensorSpec("counts", "INT32", (-1,))
    TOP_COUNTS: Final = TensorSpec("top_counts", "INT32", (-1,))  # k per SEQS entry, with LLM.TOP_TOKEN_IDS
    ENDED: Final = TensorSpec("ended_seqs", "INT64", (-1,))
    ENDED_REASONS: Final = TensorSpec("ended_reasons", "BYTES", (-1,))
    ENDED_PROMPT_TOKENS: Final = TensorSpec("ended_prompt_tokens", "INT32", (-1,))
    ENDED_COMPLETION_TOKENS: Final = TensorSpec("ended_completion_tokens", "INT32", (-1,))
    ENDED_CACHED_TOKENS: Final = TensorSpec("ended_cached_tokens", "INT32", (-1,))  # prompt tokens reused
    FAILED: Final = TensorSpec("failed_seqs", "INT64", (-1,))
    FAILED_CODES: Final = TensorSpec("failed_codes", "BYTES", (-1,))
    FAILED_MESSAGES: Final = TensorSpec("failed_messages", "BYTES", (-1,))
    BLOCKS_STORED: Final = TensorSpec("blocks_stored", "UINT64", (-1,))  # prefix-cache blocks gained (hashes)
    BLOCKS_REMOVED: Final = TensorSpec("blocks_removed", "UINT64", (-1,))  # and lost (evicted)
    BLOCKS_RESET: Final = TensorSpec("blocks_reset", "INT32", (1,))  # 1: BLOCKS_STORED is the whole cache
    OUTPUTS: Final = (SEQS, COUNTS, TOP_COUNTS, ENDED, ENDED_REASONS, ENDED_PROMPT_TOKENS, ENDED_COMPLETION_TOKENS,
                      FAILED, FAILED_CODES, FAILED_MESSAGES, ENDED_CACHED_TOKENS, BLOCKS_STORED, BLOCKS_REMOVED,
                      BLOCKS_RESET)

    TRACEPARENT: Final = "traceparent"  # an open's request parameter (string): the caller's sampled span
    # Triton's custom metric of the responses a model sent, labels model and mode (MODES): the hop counter
    RESPONSES_METRIC: Final = "inferplane_llm_responses_total"
    MODES: Final = ("request", "channel")


class Embedding:
    """The dynamically batched sentence embedder (``triton_models/embedding``).

    One text per request row: ``INPUT_IDS`` of shape [n, S] (with [CLS] ... [SEP]), ``ATTENTION_MASK`` of the
    same shape (1 = token, 0 = padding; absent = all ones); ``EMBEDDING`` [n, dim]. A request with S = 0,
    S > max_position_embeddings, ids outside the vocabulary or a bad mask gets INVALID_ARG; its batch-mates are
    served.
    """

    INPUT_IDS: Final = TensorSpec("input_ids", "INT64", (-1,), ragged=True)
    ATTENTION_MASK: Final = TensorSpec("attention_mask", "INT64", (-1,), optional=True, ragged=True)
    INPUTS: Final = (INPUT_IDS, ATTENTION_MASK)

    EMBEDDING: Final = TensorSpec("embedding", "FP32", (-1,))
    OUTPUTS: Final = (EMBEDDING,)

    PARAMETERS: Final = (CHECKPOINT_DIR, TORCH_THREADS, DTYPE)
