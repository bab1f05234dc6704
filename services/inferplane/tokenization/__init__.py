"""Tokenization as a library: one ``Tokenizer`` interface, in process or through the tokenizer service.

- ``api``: the interface (``Tokenizer``, ``TextDecoder``, ``Encoded``) and ``SplitTokenizer``.
- ``bundle``: one model's ``tokenizer.json``, chat template and special tokens (``TokenizerBundle``).
- ``detok``: UTF-8-safe incremental detokenization (``IncrementalDecoder``).
- ``local``: ``LocalTokenizer`` over a per-model ``TokenizerRegistry`` built from the catalog.
- ``remote``: ``GrpcTokenizer``, a client of the tokenizer service.

Services import this package, never each other: the tokenizer service serves ``local``, the router holds a
``Tokenizer`` chosen by its settings.
"""

from inferplane.tokenization.api import Encoded, SplitTokenizer, TextDecoder, Tokenizer
from inferplane.tokenization.bundle import TokenizerBundle
from inferplane.tokenization.detok import IncrementalDecoder
from inferplane.tokenization.local import LocalTokenizer, TokenizerRegistry, message_dicts
from inferplane.tokenization.remote import GrpcTokenizer

__all__ = [
    "Encoded",
    "GrpcTokenizer",
    "IncrementalDecoder",
    "LocalTokenizer",
    "SplitTokenizer",
    "TextDecoder",
    "Tokenizer",
    "TokenizerBundle",
    "TokenizerRegistry",
    "message_dicts",
]
