"""Hugging Face Trainer and Lightning against hand-written loops fed the same batches: one prox per
real step, with gradient accumulation, and Lightning's second configure_optimizers call.
(docs/frameworks.md's snippets, PEFT's included, run in test_docs.py.) Tiny models built from
configs: nothing is downloaded."""

import warnings

import pytest
import torch
from torch import nn
from torch.nn import functional as F

import paramreg

# the `test` extra installs them: a missing one fails here, never skips
import lightning as L
from transformers import BertConfig, BertForSequenceClassification, Trainer, TrainingArguments


def tiny_bert():
    torch.manual_seed(0)
    config = BertConfig(
        vocab_size=32, hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32,
        max_position_embeddings=8, num_labels=2, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
    )
    return BertForSequenceClassification(config)


@pytest.mark.parametrize("accepts_loss_kwargs", [None, False])
def test_hf_trainer_with_accumulation_matches_a_hand_written_loop(tmp_path, accepts_loss_kwargs):
    """Each step sees all 8 examples in 2 micro-batches of 4, whatever order the Trainer's sampler
    draws them in. BertForSequenceClassification's forward takes **kwargs, so transformers counts
    on it to divide by num_items_in_batch and does not divide by the accumulation count; its loss
    ignores it: the step's gradient is the sum of the 2 micro-batch means, twice the mean over the
    8 (docs/frameworks.md). accepts_loss_kwargs = False on the model restores the mean."""
    g = torch.Generator().manual_seed(0)
    data = [{"input_ids": torch.randint(0, 32, (6,), generator=g), "labels": torch.tensor(i % 2)} for i in range(8)]
    steps, lr, strength = 5, 0.05, 0.05
    model = tiny_bert()
    if accepts_loss_kwargs is not None:
        model.accepts_loss_kwargs = accepts_loss_kwargs
    paramreg.attach(model, "bert.encoder.*.dense.weight", l1=strength)
    args = TrainingArguments(
        output_dir=str(tmp_path), max_steps=steps, per_device_train_batch_size=4, gradient_accumulation_steps=2,
        learning_rate=lr, optim="sgd", lr_scheduler_type="constant", weight_decay=0.0, max_grad_norm=0.0,
        report_to=[], save_strategy="no", logging_strategy="no", use_cpu=True, dataloader_drop_last=True,
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        Trainer(model=model, args=args, train_dataset=data).train()

    reference = tiny_bert()
    paramreg.attach(reference, "bert.encoder.*.dense.weight", l1=strength)
    opt = torch.optim.SGD(reference.parameters(), lr=lr)
    ids, labels = torch.stack([d["input_ids"] for d in data]), torch.stack([d["labels"] for d in data])
    for _ in range(steps):
        opt.zero_grad()
        scale = 2 if accepts_loss_kwargs is None else 1  # the accumulation count, or none
        (scale * reference(input_ids=ids, labels=labels).loss).backward()
        opt.step()
    for (name, a), b in zip(model.state_dict().items(), reference.state_dict().values(), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=lambda m, name=name: f"{name}: {m}")  # sums in another order
    weight = model.bert.encoder.layer[0].output.dense.weight
    assert (weight == 0).any() and (weight != 0).any()


class Classifier(L.LightningModule):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.net = nn.Sequential(nn.Linear(8, 32), nn.ReLU(), nn.Linear(32, 2))

    def training_step(self, batch, batch_idx):
        x, y = batch
        return F.cross_entropy(self.net(x), y)

    def configure_optimizers(self):
        paramreg.attach(self.net, "*.weight", l1=0.05)  # runs once per fit
        return torch.optim.SGD(self.parameters(), lr=0.1, momentum=0.9)


def test_lightning_two_fits_with_accumulation_match_a_hand_written_loop():
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(48, 8, generator=g), torch.randint(0, 2, (48,), generator=g)
    batches = [(x[i : i + 8], y[i : i + 8]) for i in range(0, 48, 8)]
    module = Classifier()
    for _ in range(2):  # a second fit calls configure_optimizers again: attach is then a no-op
        trainer = L.Trainer(
            max_epochs=2, accelerator="cpu", accumulate_grad_batches=2, logger=False, enable_checkpointing=False,
            enable_progress_bar=False, enable_model_summary=False,
        )
        trainer.fit(module, torch.utils.data.DataLoader(list(zip(x, y, strict=True)), batch_size=8))

    reference = Classifier().net
    paramreg.attach(reference, "*.weight", l1=0.05)
    for _ in range(2):  # each fit builds a fresh optimizer
        opt = torch.optim.SGD(reference.parameters(), lr=0.1, momentum=0.9)
        for _ in range(2):
            for i, (xb, yb) in enumerate(batches):
                (F.cross_entropy(reference(xb), yb) / 2).backward()
                if i % 2 == 1:
                    opt.step()
                    opt.zero_grad()
    for a, b in zip(module.net.parameters(), reference.parameters(), strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-7)
    assert (module.net[0].weight == 0).any()
    assert [row.regularizer for row in paramreg.report(module.net)] == ["L1(strength=0.05)"] * 2


def _hf_trainer(model, tmp_path, max_steps):
    g = torch.Generator().manual_seed(0)
    data = [{"input_ids": torch.randint(0, 32, (6,), generator=g), "labels": torch.tensor(i % 2)} for i in range(32)]
    args = TrainingArguments(
        output_dir=str(tmp_path), max_steps=max_steps, per_device_train_batch_size=4, learning_rate=0.01,
        optim="adamw_torch", lr_scheduler_type="constant", weight_decay=0.0, max_grad_norm=0.0, report_to=[],
        save_strategy="steps", save_steps=3, logging_strategy="no", use_cpu=True, dataloader_drop_last=True, seed=0,
    )
    return Trainer(model=model, args=args, train_dataset=data)


def _targeted_bert():
    model = tiny_bert()
    paramreg.attach(model, "bert.encoder.*.dense.weight", sparsity=0.8, sparsity_steps=6)
    return model


def test_hf_trainer_resumes_a_target_in_the_middle_of_its_ramp_exactly(tmp_path):
    """resume_from_checkpoint at step 3 of a 6-step ramp: the step counts come back with the
    optimizer's state (Note [Resume] in optim/state.py), so the run equals the uninterrupted one;
    save_model and from_pretrained keep the zeros under the plain keys."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        full = _targeted_bert()
        _hf_trainer(full, tmp_path / "full", 8).train()
        resumed = _targeted_bert()
        _hf_trainer(resumed, tmp_path / "full", 8).train(resume_from_checkpoint=str(tmp_path / "full" / "checkpoint-3"))
    for (name, a), b in zip(full.state_dict().items(), resumed.state_dict().values(), strict=True):
        assert torch.equal(a, b), name
    dense = {n: p for n, p in full.named_parameters() if n.startswith("bert.encoder.") and n.endswith("dense.weight")}
    zeros, total = sum(int((p == 0).sum()) for p in dense.values()), sum(p.numel() for p in dense.values())
    assert zeros == round(0.8 * total)  # the target reached at the ramp's end, and held
    _hf_trainer(full, tmp_path / "saved", 1).save_model(str(tmp_path / "saved"))
    reloaded = BertForSequenceClassification.from_pretrained(str(tmp_path / "saved"))
    assert not any("parametrizations" in k for k in reloaded.state_dict())
    for name, p in dense.items():
        assert torch.equal(dict(reloaded.named_parameters())[name], p), name


class TargetedClassifier(Classifier):
    def configure_optimizers(self):
        paramreg.attach(self.net, "*.weight", sparsity=0.7, sparsity_steps=8)
        return torch.optim.AdamW(self.parameters(), lr=0.01)


def _lightning_fit(module, root, ckpt_path=None):
    """3 epochs of 4 steps, a checkpoint after each (Lightning resumes at epoch boundaries exactly;
    within an epoch it restarts the data loader)."""
    from lightning.pytorch.callbacks import ModelCheckpoint

    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(32, 8, generator=g), torch.randint(0, 2, (32,), generator=g)
    every = ModelCheckpoint(dirpath=root, every_n_epochs=1, save_top_k=-1, filename="{epoch}")
    trainer = L.Trainer(
        max_epochs=3, accelerator="cpu", logger=False, callbacks=[every], enable_progress_bar=False,
        enable_model_summary=False, default_root_dir=root,
    )
    trainer.fit(module, torch.utils.data.DataLoader(list(zip(x, y, strict=True)), batch_size=8), ckpt_path=ckpt_path)


def test_lightning_resumes_a_target_in_the_middle_of_its_ramp_exactly(tmp_path):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        full = TargetedClassifier()
        _lightning_fit(full, tmp_path)
        resumed = TargetedClassifier()
        _lightning_fit(resumed, tmp_path / "again", ckpt_path=str(tmp_path / "epoch=0.ckpt"))  # step 4 of the ramp's 8
    for a, b in zip(full.net.parameters(), resumed.net.parameters(), strict=True):
        assert torch.equal(a, b)
    weights = [full.net[0].weight, full.net[2].weight]
    assert sum(int((w == 0).sum()) for w in weights) == round(0.7 * sum(w.numel() for w in weights))
