import logging
import os

import numpy as np
import pytest
import torch
from ignite.engine import Events
from monai.data import DataLoader
from monai.handlers import CheckpointLoader
from monai.utils import set_determinism
from PIL import Image

from bundle.data import ImageCache, SAGANTrainingDataset
from bundle.engines import SAGANTrainer, attach_handlers, loss_terms
from bundle.handlers import AtomicCheckpointSaver, latest_checkpoint
from bundle.losses import SAGANCriticLoss, SAGANGeneratorLoss
from bundle.networks import SAGANCritic, SAGANGenerator
from bundle.transforms import BadImageError, LoadGrayscaleImaged, RandForeignPatchInterpolationd


def in_memory(n, seed):
    g = torch.Generator().manual_seed(seed)
    return ImageCache([{"image": torch.rand(1, 32, 32, generator=g) * 2 - 1} for _ in range(n)], transform=lambda d: d)


def build(max_epochs, epoch_length=2, unlabeled=None, handlers=(), pairs=8, **switches):
    set_determinism(seed=0)
    g = SAGANGenerator(conv_dim=4, num_res_blocks=1)
    d = SAGANCritic(conv_dim=4, num_layers=4)
    g_opt, d_opt = torch.optim.Adam(g.parameters(), 1e-3), torch.optim.Adam(d.parameters(), 1e-3)
    ds = SAGANTrainingDataset(
        in_memory(pairs, 0),
        unlabeled if unlabeled is not None else in_memory(pairs, 1),
        RandForeignPatchInterpolationd(keys="normal"),
    )
    loader = DataLoader(ds, batch_size=4, shuffle=True, drop_last=True)
    trainer = SAGANTrainer(
        device="cpu",
        max_epochs=max_epochs,
        train_data_loader=loader,
        g_network=g,
        g_optimizer=g_opt,
        d_network=d,
        d_optimizer=d_opt,
        epoch_length=epoch_length,
        **switches,
    )
    return trainer


def checkpoint_dict(t):
    return {
        "generator": t.g_network,
        "discriminator": t.d_network,
        "g_optimizer": t.g_optimizer,
        "d_optimizer": t.d_optimizer,
        "trainer": t,
    }


def test_critic_every_iteration_generator_every_second():
    trainer = build(max_epochs=3)
    steps = {"d": [], "g": []}
    trainer.d_optimizer.register_step_post_hook(lambda *a: steps["d"].append(trainer.state.iteration))
    trainer.g_optimizer.register_step_post_hook(lambda *a: steps["g"].append(trainer.state.iteration))
    g_before = [p.detach().clone() for p in trainer.g_network.parameters()]
    trainer.run()
    assert steps["d"] == [1, 2, 3, 4, 5, 6]
    assert steps["g"] == [2, 4, 6]
    assert any(not torch.equal(a, b) for a, b in zip(g_before, trainer.g_network.parameters()))
    out = trainer.state.output
    assert {"d_loss", "d_real", "d_fake", "gp", "g_loss", "g_adv", "g_identity", "g_restoration"} <= set(out)
    assert all(torch.isfinite(v) for v in out.values())


class GeneratorLossWithExtraTerm(SAGANGeneratorLoss):
    """The paper's generator loss + 0.5 * ``extra`` (a term the trainer does not know of)."""

    def forward(self, critic, fake, normal, normal_restored, pseudo_restored):
        terms = super().forward(critic, fake, normal, normal_restored, pseudo_restored)
        terms["extra"] = (normal - pseudo_restored).abs().mean()
        terms["g_loss"] = terms["g_loss"] + 0.5 * terms["extra"]
        return terms


def test_loss_functions_are_arguments_and_every_term_is_logged():
    """The trainer minimises what ``d_loss_function`` / ``g_loss_function`` return under ``d_loss`` / ``g_loss``,
    with their weights, and logs every term they return (``loss_terms``), a new one included; before the first
    generator step only the critic's terms exist."""
    trainer = build(
        max_epochs=1,
        d_loss_function=SAGANCriticLoss(lambda_gp=7.0),
        g_loss_function=GeneratorLossWithExtraTerm(lambda_identity=2.0, lambda_restoration=3.0),
    )
    logged = []
    trainer.add_event_handler(Events.ITERATION_COMPLETED, lambda e: logged.append(loss_terms(e.state.output)))
    trainer.run()
    assert set(logged[0]) == {"d_loss", "d_real", "d_fake", "gp", "d_grad_norm"}
    out = logged[1]
    assert {"g_loss", "g_adv", "g_identity", "g_restoration", "extra", "d_loss", "gp"} <= set(out)
    assert out["d_loss"] == pytest.approx(-out["d_real"] + out["d_fake"] + 7.0 * out["gp"], rel=1e-5)
    weighted = out["g_adv"] + 2.0 * out["g_identity"] + 3.0 * out["g_restoration"] + 0.5 * out["extra"]
    assert out["g_loss"] == pytest.approx(weighted, rel=1e-5)


def test_refuses_a_loader_without_a_full_batch():
    """Fewer pairs than batch_size with drop_last: ignite would "complete" a run of zero iterations."""
    with pytest.raises(ValueError, match=r"yields no batch: 3 training pairs .* batch_size 4 .* --batch_size 3"):
        build(max_epochs=1, pairs=3)


@pytest.mark.parametrize("native", [True, False])
def test_warns_when_bf16_would_be_emulated_on_the_cpu(monkeypatch, caplog, native):
    monkeypatch.setattr("bundle.engines.trainer.cpu_has_native_bf16", lambda: native)
    with caplog.at_level(logging.WARNING):
        build(max_epochs=1, autocast_dtype="bfloat16")
    assert ("oneDNN emulates bf16" in caplog.text) is not native


def test_zero_unlabeled_setting_uses_pseudo_anomalies():
    trainer = build(max_epochs=1, unlabeled=ImageCache([], transform=None))
    trainer.run()
    assert torch.isfinite(trainer.state.output["g_loss"])


def test_resume_continues_iteration_count_and_optimiser_state(tmp_path):
    first = build(max_epochs=2)
    attach_handlers(
        first,
        [
            AtomicCheckpointSaver(
                str(tmp_path),
                checkpoint_dict(first),
                file_prefix="",
                save_interval=1,
                n_saved=2,
                save_final=True,
                final_filename="checkpoint_final.pt",
            )
        ],
    )
    first.run()
    assert first.state.iteration == 4
    path = latest_checkpoint(str(tmp_path))
    assert path.endswith("checkpoint_final.pt")
    saved = torch.load(path, weights_only=True)
    assert saved["trainer"]["iteration"] == 4
    second = build(max_epochs=4)
    seen = []
    second.g_optimizer.register_step_post_hook(lambda *a: seen.append(second.state.iteration))
    attach_handlers(second, [CheckpointLoader(path, checkpoint_dict(second))])
    second.run()
    assert seen == [6, 8]  # continued at iteration 5, not 1
    assert second.state.iteration == 8
    step = second.g_optimizer.state_dict()["state"][0]["step"]
    assert int(step) == 2 + 2  # two generator steps before the resume, two after


def write_png(path, seed):
    Image.fromarray(np.random.default_rng(seed).integers(0, 255, (32, 32), dtype=np.uint8)).save(path)


@pytest.mark.parametrize("mode", ["error", "skip"])
def test_file_going_bad_during_run(tmp_path, caplog, mode):
    files = [str(tmp_path / f"u{i}.png") for i in range(8)]
    for i, f in enumerate(files):
        write_png(f, i)
    unlabeled = ImageCache([{"image": f} for f in files], LoadGrayscaleImaged("image"), cache=False, on_bad_image=mode)
    trainer = build(max_epochs=3, unlabeled=unlabeled)
    ckpt = tmp_path / "ckpt"
    attach_handlers(
        trainer,
        [
            AtomicCheckpointSaver(
                str(ckpt), checkpoint_dict(trainer), save_final=True, final_filename="checkpoint_final.pt"
            )
        ],
    )

    @trainer.on(__import__("ignite").engine.Events.ITERATION_COMPLETED(once=2))
    def corrupt(_):
        with open(files[3], "wb") as f:
            f.write(b"not an image")

    if mode == "error":
        with pytest.raises(BadImageError, match="u3.png: cannot read image"):
            trainer.run()
        saved = torch.load(ckpt / "checkpoint_final.pt", weights_only=True)
        assert saved["trainer"]["iteration"] >= 2
    else:
        with caplog.at_level(logging.WARNING):
            trainer.run()
        assert trainer.state.iteration == 6
        assert any("u3.png" in r.getMessage() for r in caplog.records)
        assert trainer.data_loader.dataset.n_skipped >= 1  # counted; the pair was drawn anew, not a neighbour
        assert os.path.isfile(ckpt / "checkpoint_final.pt")
