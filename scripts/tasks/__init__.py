"""Training tasks for ``scripts/train.py``: a model, a training set sharded over ranks, a loss and an accuracy.

Every batch is a pure function of (seed, rank, step), so a run resumed from a checkpoint sees the
same batches as one that never stopped.

| task | model | data |
|---|---|---|
| ``resnet18-fashion`` | ResNet-18, CIFAR stem, 1 input channel (``--width``, 64 = full) | Fashion-MNIST 60k/10k |
| ``bert-mlm`` | BERT masked LM: ``--size tiny`` (2 layers, 128 hidden) or ``minilm`` (MiniLM-L6 weights) | WordNet glosses |
| ``bert-sentiment`` | BERT classifier (MiniLM-L6 weights, or tiny) | Rotten Tomatoes, fresh vs rotten |
| ``smollm2`` | SmolLM2-135M-Instruct causal LM (GGUF, dequantised to fp32) | WordNet glosses |
| ``gpt2-tiny`` | GPT-2 config, random init (2 layers, 128 hidden) | WordNet glosses |
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass

import torch
from torch import nn

from . import data
from .resnet import ResNet18


@dataclass
class Batch:
    inputs: dict[str, torch.Tensor]
    labels: torch.Tensor

    def to(self, device: torch.device) -> Batch:
        """The same batch on ``device`` (the engine's: a GPU when there is one)."""
        return Batch({k: v.to(device, non_blocking=True) for k, v in self.inputs.items()}, self.labels.to(device))


class Task:
    """A training problem: ``build_model``, ``train_batch(step)``, ``loss_and_hits``, ``eval_batches``."""

    name = ""

    def __init__(self, args: argparse.Namespace, rank: int, world: int) -> None:
        self.args, self.rank, self.world = args, rank, world

    def build_model(self) -> nn.Module:
        raise NotImplementedError

    def load_data(self) -> None:
        """Fill ``self.train`` and ``self.test``: tuples of equally long tensors (first dim = examples)."""
        raise NotImplementedError

    # -- batches ----------------------------------------------------------------------
    def train_batch(self, step: int, batch_size: int) -> Batch:
        """Step ``step`` (1-based) of this rank's shard: epochs of fresh permutations of the shard."""
        n = self.train[0].shape[0]
        local = torch.arange(self.rank, n, self.world)
        start = (step - 1) * batch_size
        idx = []
        while len(idx) < batch_size:
            epoch, offset = divmod(start + len(idx), len(local))
            perm = torch.randperm(
                len(local),
                generator=torch.Generator().manual_seed(1_000_003 * self.args.seed + 7919 * epoch + self.rank),
            )
            idx += local[perm[offset : offset + batch_size - len(idx)]].tolist()
        return self.make_batch([t[idx] for t in self.train], step)

    def eval_batches(self, batch_size: int):
        """This rank's share of the test set (ranks together cover it once)."""
        n = min(self.test[0].shape[0], self.args.eval_examples)
        for start in range(self.rank * batch_size, n, self.world * batch_size):
            yield self.make_batch([t[start : min(start + batch_size, n)] for t in self.test], step=0)

    def make_batch(self, tensors: list[torch.Tensor], step: int) -> Batch:
        return Batch({"x": tensors[0]}, tensors[1])

    def loss_and_hits(self, model: nn.Module, batch: Batch) -> tuple[torch.Tensor, int, int]:
        """Mean loss, correct predictions, predictions made."""
        logits = model(batch.inputs["x"])
        return (
            nn.functional.cross_entropy(logits, batch.labels),
            int((logits.argmax(-1) == batch.labels).sum()),
            len(batch.labels),
        )


class ResNetFashion(Task):
    name = "resnet18-fashion"

    def build_model(self) -> nn.Module:
        return ResNet18(in_channels=1, num_classes=10, width=self.args.width)

    def load_data(self) -> None:
        self.train, self.test = data.fashion_mnist("train"), data.fashion_mnist("test")

    def make_batch(self, tensors: list[torch.Tensor], step: int) -> Batch:
        x, y = tensors
        if step:  # training augmentation: random flips and 2-pixel shifts (as the paper's CIFAR crops)
            gen = torch.Generator().manual_seed(31 * step + self.rank)
            flip = torch.rand(len(x), generator=gen) < 0.5
            x = torch.where(flip[:, None, None, None], x.flip(-1), x)
            dx, dy = (int(v) for v in torch.randint(-2, 3, (2,), generator=gen))
            x = torch.roll(nn.functional.pad(x, (2, 2, 2, 2)), (dy, dx), (-2, -1))[..., 2:-2, 2:-2]
        return Batch({"x": x}, y)


class TextTask(Task):
    """Tokenised text in fixed-length rows."""

    seq_len = 64

    def tokenizer(self):
        from transformers import AutoTokenizer

        return AutoTokenizer.from_pretrained(str(data.minilm_dir()))

    def encode_stream(self, texts: list[str], tokenizer) -> torch.Tensor:
        """Concatenate the texts' tokens (each ended by the separator) and cut rows of ``seq_len``."""
        ids = tokenizer(texts, add_special_tokens=False)["input_ids"]
        sep = tokenizer.sep_token_id if tokenizer.sep_token_id is not None else tokenizer.eos_token_id
        flat = torch.tensor([t for row in ids for t in (*row, sep)], dtype=torch.long)
        rows = flat.numel() // self.seq_len
        return flat[: rows * self.seq_len].view(rows, self.seq_len)

    def tiny_bert_config(self, **extra):
        """``--size tiny``: a 2-layer BERT, hidden 128, on the MiniLM vocabulary (random init)."""
        from transformers import BertConfig

        return BertConfig(
            vocab_size=self.tok.vocab_size,
            hidden_size=128,
            num_hidden_layers=2,
            num_attention_heads=2,
            intermediate_size=512,
            max_position_embeddings=self.seq_len,
            **extra,
        )

    def load_glosses(self) -> None:
        self.tok = self.tokenizer()
        rows = self.encode_stream(data.wordnet_glosses(limit=self.args.text_limit), self.tok)
        n_test = max(len(rows) // 20, 1)
        self.train, self.test = (rows[n_test:], rows[n_test:]), (rows[:n_test], rows[:n_test])


class BertMLM(TextTask):
    name = "bert-mlm"
    mask_prob = 0.15

    def build_model(self) -> nn.Module:
        from transformers import BertForMaskedLM

        if self.args.size == "minilm":
            return BertForMaskedLM.from_pretrained(str(data.minilm_dir()))  # the MLM head starts fresh
        return BertForMaskedLM(self.tiny_bert_config())

    load_data = TextTask.load_glosses

    def make_batch(self, tensors: list[torch.Tensor], step: int) -> Batch:
        """BERT masking: 15% of positions are predicted; of those 80% [MASK], 10% random, 10% kept."""
        ids = tensors[0].clone()
        gen = torch.Generator().manual_seed(17 * step + self.rank if step else 12345)
        picked = torch.rand(ids.shape, generator=gen) < self.mask_prob
        labels = torch.where(picked, ids, torch.full_like(ids, -100))
        roll = torch.rand(ids.shape, generator=gen)
        ids[picked & (roll < 0.8)] = self.tok.mask_token_id
        random_ids = torch.randint(0, self.tok.vocab_size, ids.shape, generator=gen)
        swap = picked & (roll >= 0.8) & (roll < 0.9)
        ids[swap] = random_ids[swap]
        return Batch({"input_ids": ids}, labels)

    def loss_and_hits(self, model: nn.Module, batch: Batch) -> tuple[torch.Tensor, int, int]:
        # The vocabulary head runs on the masked positions only (the same loss, ~7x less head work).
        mlm = getattr(model, "module", model)  # a DeepSpeed engine's module, or the model itself
        hidden = mlm.bert(**batch.inputs).last_hidden_state
        picked = batch.labels != -100
        logits = mlm.cls(hidden[picked])
        loss = nn.functional.cross_entropy(logits, batch.labels[picked])
        return loss, int((logits.argmax(-1) == batch.labels[picked]).sum()), int(picked.sum())


class BertSentiment(TextTask):
    name = "bert-sentiment"

    def build_model(self) -> nn.Module:
        from transformers import BertForSequenceClassification

        if self.args.size == "minilm":
            return BertForSequenceClassification.from_pretrained(str(data.minilm_dir()), num_labels=2)
        return BertForSequenceClassification(self.tiny_bert_config(num_labels=2))

    def load_data(self) -> None:
        self.tok = self.tokenizer()
        texts, labels = data.rotten_tomatoes()
        enc = self.tok(texts, padding="max_length", truncation=True, max_length=self.seq_len, return_tensors="pt")
        perm = torch.randperm(len(labels), generator=torch.Generator().manual_seed(0))  # one fixed split
        ids, mask, labels = enc["input_ids"][perm], enc["attention_mask"][perm], labels[perm]
        n_test = len(labels) // 10
        self.train = (ids[n_test:], mask[n_test:], labels[n_test:])
        self.test = (ids[:n_test], mask[:n_test], labels[:n_test])

    def make_batch(self, tensors: list[torch.Tensor], step: int) -> Batch:
        return Batch({"input_ids": tensors[0], "attention_mask": tensors[1]}, tensors[2])

    def loss_and_hits(self, model: nn.Module, batch: Batch) -> tuple[torch.Tensor, int, int]:
        logits = model(**batch.inputs).logits
        return (
            nn.functional.cross_entropy(logits, batch.labels),
            int((logits.argmax(-1) == batch.labels).sum()),
            len(batch.labels),
        )


class CausalLM(TextTask):
    """Next-token prediction; accuracy is next-token accuracy."""

    load_data = TextTask.load_glosses

    def make_batch(self, tensors: list[torch.Tensor], step: int) -> Batch:
        return Batch({"input_ids": tensors[0]}, tensors[0])

    def loss_and_hits(self, model: nn.Module, batch: Batch) -> tuple[torch.Tensor, int, int]:
        logits = model(**batch.inputs).logits[:, :-1]
        target = batch.labels[:, 1:]
        loss = nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), target.reshape(-1))
        return loss, int((logits.argmax(-1) == target).sum()), target.numel()


class SmolLM2(CausalLM):
    name = "smollm2"
    seq_len = 32

    def tokenizer(self):
        from transformers import AutoTokenizer

        return AutoTokenizer.from_pretrained(str(data.smollm2_dir()), gguf_file=data.SMOLLM2_GGUF)

    def build_model(self) -> nn.Module:
        from transformers import AutoModelForCausalLM

        return AutoModelForCausalLM.from_pretrained(
            str(data.smollm2_dir()), gguf_file=data.SMOLLM2_GGUF, dtype=torch.float32
        )


class GPT2Tiny(CausalLM):
    name = "gpt2-tiny"

    def build_model(self) -> nn.Module:
        from transformers import GPT2Config, GPT2LMHeadModel

        config = GPT2Config(vocab_size=self.tok.vocab_size, n_positions=self.seq_len, n_embd=128, n_layer=2, n_head=2)
        return GPT2LMHeadModel(config)


TASKS: dict[str, type[Task]] = {t.name: t for t in (ResNetFashion, BertMLM, BertSentiment, SmolLM2, GPT2Tiny)}
