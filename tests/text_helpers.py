"""A tiny GPT-2 + byte-level BPE tokenizer saved as an HF folder, for fast text tests."""
from __future__ import annotations

from pathlib import Path

WORDS = ("the cat sat on the mat and the dog ran to the park while a bird sang in the tree "
         "every morning she reads a book about ships and stars and the sea is calm today").split()


def corpus(n_sentences: int = 200, seed: int = 0) -> str:
    import random

    rng = random.Random(seed)
    return "\n".join(" ".join(rng.choice(WORDS) for _ in range(rng.randint(4, 10))) + "." for _ in range(n_sentences))


def make_tiny_lm(folder: Path, n_positions: int = 64, seed: int = 0) -> Path:
    """A 2-layer, 32-wide GPT-2 with random weights and a ~300-token BPE, saved to `folder`."""
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import GPT2Config, GPT2LMHeadModel, PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=320, special_tokens=["<|endoftext|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(corpus().split("\n"), trainer=trainer)
    eos = "<|endoftext|>"
    hf_tok = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=eos, eos_token=eos, unk_token=eos)
    torch.manual_seed(seed)
    config = GPT2Config(vocab_size=len(hf_tok), n_positions=n_positions, n_embd=32, n_layer=2, n_head=2,
                        bos_token_id=0, eos_token_id=0)
    model = GPT2LMHeadModel(config)
    folder.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(folder)
    hf_tok.save_pretrained(folder)
    return folder


def make_pretrained_tiny_lm(folder: Path) -> Path:
    """make_tiny_lm, then 150 steps on the corpus: it knows the words; a new text in them differs in their order."""
    import torch
    from transformers import GPT2LMHeadModel, PreTrainedTokenizerFast

    from engine.text import lm_finetune

    make_tiny_lm(folder, n_positions=64)
    model = GPT2LMHeadModel.from_pretrained(folder)
    tok = PreTrainedTokenizerFast.from_pretrained(folder)
    xs, ys = lm_finetune.blocks(torch.tensor(tok(corpus(600, seed=1))["input_ids"]), 32)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    g = torch.Generator().manual_seed(0)
    model.train()
    for _ in range(150):
        idx = torch.randint(0, len(xs), (16,), generator=g)
        lm_finetune.train_step(model, opt, xs[idx], ys[idx], 3e-3)
    model.save_pretrained(folder)
    return folder


def tiny_text_lab(experiment: str, data: str, weights: str, **kw):
    """A text Lab experiment small enough for a test: 12 steps, perplexity every 4, 32-token blocks."""
    from engine.lab import experiments

    return experiments.LabConfig(experiment, data=data, weights=weights, **{
        "steps": 12, "eval_every": 4, "seeds": 1, "block_size": 32, "batch_size": 8, "val_tokens": 256, "lr": 2e-3, **kw})
