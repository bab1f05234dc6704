"""Train the project's tiny Llama on the docstrings of Python's standard library.

    python scripts/train_tiny_llama.py                       # ~8 minutes on 2 cores -> models/tiny-llama
    python scripts/train_tiny_llama.py --minutes 2 --out /tmp/tl
    python scripts/train_tiny_llama.py --steps 600           # fixed step count instead of a time budget

Every machine has the text: module/class/function docstrings of the running interpreter's stdlib
(tests and site-packages left out), walked in sorted order. Part of them is also written as chat turns
(a docstring's first line as the user's "question", its body as the assistant's answer) through the
same Jinja chat template that ships in tokenizer_config.json, so chat prompts look like training data.

The run is seeded. With a time budget the step count is fixed after a short calibration and printed;
pass ``--steps`` with that number to repeat a run exactly on another machine (same Python, same torch).
The output directory is a Hugging Face Llama checkpoint (config.json, model.safetensors in HF names,
tokenizer.json, tokenizer_config.json with chat_template, generation_config.json, README.md).
"""

from __future__ import annotations

import argparse
import ast
import functools
import json
import math
import platform
import random
import sys
import sysconfig
import time
import tokenize
from dataclasses import dataclass
from pathlib import Path

import jinja2
import numpy as np
import torch
import torch.nn.functional as F
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "services"))

from inferplane.modeling.llama import (  # noqa: E402 - needs the repository on sys.path
    LlamaConfig,
    LlamaForCausalLM,
    SamplingParams,
    count_parameters,
    generate,
    save_checkpoint,
)

BOS, EOS, PAD = "<s>", "</s>", "<pad>"
USER, ASSISTANT, SYSTEM, END = "<|user|>", "<|assistant|>", "<|system|>", "<|end|>"
SPECIAL_TOKENS = [BOS, EOS, PAD, USER, ASSISTANT, SYSTEM, END]  # ids 0..6 in this order
CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{{ '<|' + message['role'] + '|>' + message['content'] + '<|end|>' }}"
    "{% if message['role'] == 'assistant' %}{{ eos_token }}{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>' }}{% endif %}"
)
SYSTEM_PROMPT = "You explain the Python standard library."
SKIP_DIRS = {"site-packages", "dist-packages", "test", "tests", "idle_test", "__pycache__", "lib-dynload",
             "ensurepip", "turtledemo"}


@dataclass(frozen=True)
class Doc:
    name: str  # dotted name, e.g. json.dumps
    header: str  # what precedes the docstring in the plain format, e.g. "json.dumps(obj, *, ...)"
    text: str  # the cleaned docstring


# ---------------------------------------------------------------- corpus


def stdlib_files(root: Path) -> list[Path]:
    files = []
    for path in sorted(root.rglob("*.py")):
        rel = path.relative_to(root)
        if any(part in SKIP_DIRS or part.startswith("config-") for part in rel.parts[:-1]):
            continue
        files.append(path)
    return files


def module_name(rel: Path) -> str:
    parts = list(rel.with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def docs_of_file(path: Path, modname: str) -> list[Doc]:
    try:
        with tokenize.open(path) as f:
            tree = ast.parse(f.read(), filename=str(path))
    except (SyntaxError, UnicodeDecodeError, ValueError):
        return []
    out: list[Doc] = []
    if doc := ast.get_docstring(tree):
        out.append(Doc(modname, modname, doc))

    def visit(body: list[ast.stmt], prefix: str) -> None:
        for node in body:
            if isinstance(node, ast.ClassDef | ast.FunctionDef | ast.AsyncFunctionDef):
                name = f"{prefix}.{node.name}"
                if isinstance(node, ast.ClassDef):
                    bases = ", ".join(ast.unparse(b) for b in node.bases)
                    header = f"class {name}({bases})" if bases else f"class {name}"
                else:
                    header = f"{name}({ast.unparse(node.args)})"
                if doc := ast.get_docstring(node):
                    out.append(Doc(name, header, doc))
                visit(node.body, name)

    visit(tree.body, modname)
    return out


def collect_docs(root: Path, min_chars: int = 24) -> list[Doc]:
    seen: set[str] = set()
    docs: list[Doc] = []
    for path in stdlib_files(root):
        for d in docs_of_file(path, module_name(path.relative_to(root))):
            if len(d.text) < min_chars or d.text in seen:
                continue
            seen.add(d.text)
            docs.append(d)
    return docs


@functools.cache
def chat_template() -> jinja2.Template:
    return jinja2.Environment().from_string(CHAT_TEMPLATE)


def render_chat(messages: list[dict[str, str]], add_generation_prompt: bool = False) -> str:
    return chat_template().render(messages=messages, add_generation_prompt=add_generation_prompt, bos_token=BOS,
                           eos_token=EOS)


def chat_example(d: Doc, rng: random.Random) -> str | None:
    """A docstring as a chat exchange, or None when it has no body to answer with."""
    first, _, body = d.text.partition("\n")
    body = body.strip()
    if len(body) < 40:
        return None
    short = d.name.rsplit(".", 1)[-1]
    question, answer = rng.choice([
        (first.strip(), body),
        (f"What does {short} do?", d.text),
        (f"Explain {d.name}.", d.text),
        (f"{d.name}: {first.strip()}", body),
    ])
    messages = [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]
    if rng.random() < 0.3:
        messages.insert(0, {"role": "system", "content": SYSTEM_PROMPT})
    return render_chat(messages)  # ends <|end|></s>: the template closes assistant turns with eos


def build_texts(docs: list[Doc], seed: int) -> list[str]:
    """Plain docs as "<s>header\\n\\ndocstring</s>", then chat examples; interleaved deterministically."""
    rng = random.Random(seed)
    texts = [f"{BOS}{d.header}\n\n{d.text}{EOS}" for d in docs]
    texts += [c for d in docs if (c := chat_example(d, rng)) is not None]
    rng.shuffle(texts)
    return texts


# ---------------------------------------------------------------- tokenizer


def train_tokenizer(texts: list[str], vocab_size: int) -> Tokenizer:
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS, min_frequency=2, show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator(texts, trainer=trainer)
    # Like Llama's tokenizers: plain encodes get <s> in front; chat prompts bring their own (template).
    tok.post_processor = processors.TemplateProcessing(single=f"{BOS} $A", special_tokens=[(BOS, 0)])
    for i, t in enumerate(SPECIAL_TOKENS):
        assert tok.token_to_id(t) == i, f"special token {t} got id {tok.token_to_id(t)}, expected {i}"
    return tok


def tokenize_texts(tok: Tokenizer, texts: list[str]) -> np.ndarray:
    ids: list[int] = []
    for enc in tok.encode_batch(texts, add_special_tokens=False):
        ids.extend(enc.ids)
    return np.asarray(ids, dtype=np.int16 if tok.get_vocab_size() < 2**15 else np.int32)


# ---------------------------------------------------------------- model + training


def init_weights(model: LlamaForCausalLM) -> None:
    n_layers = model.config.num_hidden_layers
    for name, p in model.named_parameters():
        if p.ndim == 2:
            std = 0.02 / math.sqrt(2 * n_layers) if name.endswith(("o_proj.weight", "down_proj.weight")) else 0.02
            torch.nn.init.normal_(p, mean=0.0, std=std)


def batch(stream: torch.Tensor, batch_size: int, seq_len: int, gen: torch.Generator) -> torch.Tensor:
    starts = torch.randint(0, stream.numel() - seq_len - 1, (batch_size,), generator=gen)
    return torch.stack([stream[s : s + seq_len + 1] for s in starts.tolist()]).long()  # [B, S+1]


def lm_loss(model: LlamaForCausalLM, xy: torch.Tensor) -> torch.Tensor:
    logits = model(xy[:, :-1])  # [B, S, V]
    return F.cross_entropy(logits.flatten(0, 1), xy[:, 1:].flatten())


def lr_at(step: int, total: int, peak: float, warmup: int) -> float:
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return peak * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))


@torch.no_grad()
def evaluate(model: LlamaForCausalLM, stream: torch.Tensor, args: argparse.Namespace) -> float:
    model.eval()
    gen = torch.Generator().manual_seed(args.seed + 1)
    losses = [float(lm_loss(model, batch(stream, args.batch_size, args.seq_len, gen))) for _ in range(10)]
    model.train()
    return sum(losses) / len(losses)


def fmt_s(s: float) -> str:
    return f"{int(s) // 60}m{int(s) % 60:02d}s"


def train(model: LlamaForCausalLM, train_stream: torch.Tensor, args: argparse.Namespace) -> dict[str, float]:
    # No weight decay on the RMSNorm gains (1-D); decay the matrices.
    params = list({id(p): p for p in model.parameters()}.values())
    groups = [{"params": [p for p in params if p.ndim >= 2], "weight_decay": 0.1},
              {"params": [p for p in params if p.ndim < 2], "weight_decay": 0.0}]
    opt = torch.optim.AdamW(groups, lr=args.lr, betas=(0.9, 0.95))
    gen = torch.Generator().manual_seed(args.seed)
    budget_s, tokens_per_step = args.minutes * 60, args.batch_size * args.seq_len
    total = args.steps or 0  # 0 = decided after calibrating
    started, step, ema, warm_at = time.monotonic(), 0, float("nan"), 0.0
    while total == 0 or step < total:
        for g in opt.param_groups:
            g["lr"] = lr_at(step, total or 10**9, args.lr, args.warmup)
        loss = lm_loss(model, batch(train_stream, args.batch_size, args.seq_len, gen))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        step += 1
        value = loss.detach().item()
        ema = value if math.isnan(ema) else 0.95 * ema + 0.05 * value
        elapsed = time.monotonic() - started
        if step == 3:
            warm_at = elapsed  # the first steps are slow (allocator, thread pool): keep them out of the rate
        if total == 0 and step == args.calibration_steps:
            # Calibration ends inside warmup, so the schedule so far never depended on `total`.
            per_step = (elapsed - warm_at) / (step - 3)
            total = max(step + 1, step + int((budget_s - elapsed) / per_step))
            print(f"calibrated: {per_step:.2f}s/step -> {total} steps in {args.minutes:g} min "
                  f"(repeat with --steps {total})", flush=True)
        if total and (step % args.log_every == 0 or step == total):
            eta = (total - step) * elapsed / step
            print(f"step {step:5d}/{total}  loss {ema:.3f}  lr {opt.param_groups[0]['lr']:.2e}  "
                  f"{step * tokens_per_step / elapsed:,.0f} tok/s  elapsed {fmt_s(elapsed)}  ETA {fmt_s(eta)}",
                  flush=True)
        if not args.steps and elapsed > 1.15 * budget_s:
            print(f"stopping at step {step}: over the time budget (machine busier than at calibration)")
            break
    return {"steps": step, "train_loss": ema, "train_seconds": time.monotonic() - started,
            "tokens_seen": step * tokens_per_step}


# ---------------------------------------------------------------- output files


def write_tokenizer_files(tok: Tokenizer, out: Path, max_len: int) -> None:
    tok.save(str(out / "tokenizer.json"))
    added = {
        str(i): {"content": t, "lstrip": False, "normalized": False, "rstrip": False, "single_word": False,
                 "special": True}
        for i, t in enumerate(SPECIAL_TOKENS)
    }
    chat_tokens = [USER, ASSISTANT, SYSTEM, END]
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "add_bos_token": True,
        "add_eos_token": False,
        "bos_token": BOS,
        "eos_token": EOS,
        "pad_token": PAD,
        "unk_token": None,
        "additional_special_tokens": chat_tokens,
        "added_tokens_decoder": added,
        "model_max_length": max_len,
        "clean_up_tokenization_spaces": False,
        "chat_template": CHAT_TEMPLATE,
    }
    (out / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n")
    special = {"bos_token": BOS, "eos_token": EOS, "pad_token": PAD, "additional_special_tokens": chat_tokens}
    (out / "special_tokens_map.json").write_text(json.dumps(special, indent=2) + "\n")


def write_generation_config(tok: Tokenizer, out: Path) -> None:
    cfg = {"bos_token_id": tok.token_to_id(BOS), "eos_token_id": [tok.token_to_id(EOS), tok.token_to_id(END)],
           "pad_token_id": tok.token_to_id(PAD), "do_sample": False, "max_new_tokens": 128}
    (out / "generation_config.json").write_text(json.dumps(cfg, indent=2) + "\n")


def samples(model: LlamaForCausalLM, tok: Tokenizer, prompts: list[str], stop_ids: list[int]) -> list[str]:
    model.eval()
    outs = []
    for p in prompts:
        ids = tok.encode(p, add_special_tokens=not p.startswith(BOS)).ids
        new = [s.token_id for s in generate(model, ids, max_tokens=60, sampling=SamplingParams(),
                                            stop_ids=stop_ids)]
        outs.append(tok.decode(new))
    return outs


def write_readme(out: Path, info: dict[str, object], examples: list[tuple[str, str]]) -> None:
    shown = "\n\n".join(f"Prompt: `{p!r}`\n\n```text\n{o}\n```" for p, o in examples)
    text = f"""# tiny-llama (inferplane)

A {info['params_m']:.2f} M-parameter Llama trained from scratch by `scripts/train_tiny_llama.py` on the
docstrings of Python {info['python']}'s standard library (module, class and function docstrings, tests and
site-packages excluded), part of them also written as `<|user|>...<|end|><|assistant|>...<|end|>` chat
turns. It exists so that the whole serving path (tokenizer, Triton, streaming, cancellation) runs on a
CPU-only machine with a real model; it knows docstring-flavoured English and little else.

| | |
|---|---|
| architecture | LlamaForCausalLM: hidden {info['hidden_size']}, {info['layers']} layers, {info['heads']} heads, \
{info['kv_heads']} kv heads (GQA), SwiGLU {info['intermediate_size']}, RoPE theta {info['rope_theta']:g}, \
tied embeddings |
| vocabulary | {info['vocab_size']} byte-level BPE tokens (`tokenizers`), specials {', '.join(SPECIAL_TOKENS)} |
| context | {info['max_position_embeddings']} positions (trained on {info['seq_len']}-token windows) |
| corpus | {info['docs']} docstrings, {info['corpus_tokens']:,} tokens ({info['corpus_mb']:.1f} MB of text) |
| training | {info['steps']} steps x {info['tokens_per_step']} tokens, AdamW lr {info['lr']:g}, seed {info['seed']}, \
{info['train_minutes']:.1f} min on {info['threads']} CPU threads (torch {info['torch']}) |
| loss | train {info['train_loss']:.3f}, validation {info['val_loss']:.3f} (nats/token) |
| weights | `model.safetensors`, bfloat16, Hugging Face Llama parameter names |

Reproduce (same Python {info['python']}, same torch): `python scripts/train_tiny_llama.py --steps {info['steps']}`.
The corpus is read from the running interpreter, so another Python version gives a different model.

Chat: render `tokenizer_config.json`'s `chat_template` and encode without adding special tokens; stop on
`</s>` or `<|end|>` (`generation_config.json`).

## Greedy samples

{shown}
"""
    (out / "README.md").write_text(text)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=ROOT / "services" / "inferplane" / "assets" / "models" / "tiny-llama")
    ap.add_argument("--minutes", type=float, default=8.0, help="training-loop time budget")
    ap.add_argument("--steps", type=int, default=0, help="fixed step count (overrides --minutes)")
    ap.add_argument("--seed", type=int, default=1234)
    ap.add_argument("--vocab-size", type=int, default=4096)
    ap.add_argument("--hidden-size", type=int, default=256)
    ap.add_argument("--intermediate-size", type=int, default=688)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--heads", type=int, default=8)
    ap.add_argument("--kv-heads", type=int, default=2)
    ap.add_argument("--max-position-embeddings", type=int, default=512)
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--batch-size", type=int, default=12)
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--warmup", type=int, default=40)
    ap.add_argument("--calibration-steps", type=int, default=15)
    ap.add_argument("--log-every", type=int, default=25)
    ap.add_argument("--threads", type=int, default=torch.get_num_threads())
    args = ap.parse_args()
    assert args.calibration_steps < args.warmup, "calibration must finish inside warmup"
    t0 = time.monotonic()
    torch.manual_seed(args.seed)
    torch.set_num_threads(args.threads)

    stdlib = Path(sysconfig.get_paths()["stdlib"])
    docs = collect_docs(stdlib)
    texts = build_texts(docs, args.seed)
    corpus_mb = sum(len(t.encode()) for t in texts) / 1e6
    print(f"corpus: {len(docs)} docstrings from {stdlib} -> {len(texts)} texts, {corpus_mb:.1f} MB", flush=True)

    tok = train_tokenizer(texts, args.vocab_size)
    n_val = max(1, len(texts) // 50)  # 2% held out, whole texts
    train_ids = torch.from_numpy(tokenize_texts(tok, texts[n_val:]))
    val_ids = torch.from_numpy(tokenize_texts(tok, texts[:n_val]))
    print(f"tokenizer: {tok.get_vocab_size()} tokens; {train_ids.numel():,} train / {val_ids.numel():,} "
          f"val tokens ({corpus_mb * 1e6 / (train_ids.numel() + val_ids.numel()):.2f} bytes/token) "
          f"[{fmt_s(time.monotonic() - t0)}]", flush=True)

    cfg = LlamaConfig(
        vocab_size=tok.get_vocab_size(), hidden_size=args.hidden_size, intermediate_size=args.intermediate_size,
        num_hidden_layers=args.layers, num_attention_heads=args.heads, num_key_value_heads=args.kv_heads,
        max_position_embeddings=args.max_position_embeddings, rms_norm_eps=1e-5, rope_theta=10000.0,
        tie_word_embeddings=True, bos_token_id=tok.token_to_id(BOS), eos_token_id=tok.token_to_id(EOS),
    )
    model = LlamaForCausalLM(cfg)
    init_weights(model)
    n_params = count_parameters(model)
    print(f"model: {n_params / 1e6:.2f} M parameters, {args.batch_size}x{args.seq_len} tokens/step", flush=True)

    stats = train(model, train_ids, args)
    val_loss = evaluate(model, val_ids, args)
    print(f"done: {stats['steps']} steps, train loss {stats['train_loss']:.3f}, val loss {val_loss:.3f}, "
          f"{fmt_s(stats['train_seconds'])}", flush=True)

    args.out.mkdir(parents=True, exist_ok=True)
    save_checkpoint(model, args.out, dtype=torch.bfloat16)
    write_tokenizer_files(tok, args.out, args.max_position_embeddings)
    write_generation_config(tok, args.out)
    stop_ids = [tok.token_to_id(EOS), tok.token_to_id(END)]
    prompts = [
        "Return the number of",
        "Create a new",
        render_chat([{"role": "user", "content": "What does dumps do?"}], add_generation_prompt=True),
    ]
    examples = list(zip(prompts, samples(model, tok, prompts, stop_ids), strict=True))
    for p, o in examples:
        print(f"--- {p!r}\n{o}")
    info: dict[str, object] = {
        "params_m": n_params / 1e6, "python": platform.python_version(), "hidden_size": cfg.hidden_size,
        "layers": cfg.num_hidden_layers, "heads": cfg.num_attention_heads, "kv_heads": cfg.num_key_value_heads,
        "intermediate_size": cfg.intermediate_size, "rope_theta": cfg.rope_theta, "vocab_size": cfg.vocab_size,
        "max_position_embeddings": cfg.max_position_embeddings, "seq_len": args.seq_len, "docs": len(docs),
        "corpus_tokens": train_ids.numel() + val_ids.numel(), "corpus_mb": corpus_mb, "steps": stats["steps"],
        "tokens_per_step": args.batch_size * args.seq_len, "lr": args.lr, "seed": args.seed,
        "train_minutes": stats["train_seconds"] / 60, "threads": args.threads, "torch": torch.__version__,
        "train_loss": stats["train_loss"], "val_loss": val_loss,
    }
    write_readme(args.out, info, examples)
    print(f"wrote {args.out} [{fmt_s(time.monotonic() - t0)} total]")


if __name__ == "__main__":
    main()
