"""The model code that runs inside Triton's model processes: torch, numpy, safetensors and the standard library only.

- ``llama``: a Llama-architecture decoder (KV cache, Hugging Face checkpoint loader, sampling, ``generate()``,
  the continuous-batching scheduler).
- ``bert``: a BERT encoder and sentence-transformers' pooling, for sentence embeddings.
- ``contract``: the tensors, parameters and error codes the Triton models share with the executor.

Nothing here imports the rest of ``inferplane``: the executor's repository renderer copies this package into
each model's version folder, so that a Triton model loads without the mesh's code. This file imports nothing,
so that the executor can import ``inferplane.modeling.contract`` without torch.
"""
