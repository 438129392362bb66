"""Global-batch statistics of official mode on 2 CPU workers (gloo): each rank holds half the batch, and the
results must be those of one process holding all of it (what the official single-process code computed).

* :class:`GlobalBatchNorm2d` (LBAM's discriminator BatchNorm): outputs, gradients to the input and parameters,
  and second derivatives (the gradient penalty differentiates D twice), running statistics;
* :func:`global_mean` and RN's official hole-L1 normaliser: the per-rank losses average to the full-batch loss.
"""

from __future__ import annotations

import copy
import os
import socket
from pathlib import Path

import torch
import torch.multiprocessing as mp
import torch.nn as nn

from pipeline.train.global_batch import GlobalBatchNorm2d, distributed_world, global_mean, use_global_batch_norm

WORLD = 2


def _critic() -> nn.Module:
    """A small BatchNorm discriminator shaped like one LBAM column (conv, BN, LeakyReLU), scoring each sample."""
    torch.manual_seed(3)
    return nn.Sequential(
        nn.Conv2d(3, 8, 4, stride=2, padding=1), nn.BatchNorm2d(8), nn.LeakyReLU(0.2),
        nn.Conv2d(8, 1, 4, stride=2, padding=1),
    )


def _batch():
    generator = torch.Generator().manual_seed(5)
    image = torch.rand(4, 3, 16, 16, generator=generator)
    mask = (torch.rand(4, 1, 16, 16, generator=generator) > 0.6).float()
    mask[2:] *= 0.3 > torch.rand(2, 1, 16, 16, generator=generator)  # ranks hold different hole fractions
    pred = torch.rand(4, 3, 16, 16, generator=generator, requires_grad=True)
    return image, mask, pred


def _step(critic: nn.Module, image: torch.Tensor) -> dict[str, torch.Tensor]:
    """Score, then a gradient-penalty-like second derivative, as LBAM's D step does."""
    x = image.clone().requires_grad_(True)
    scores = critic(x).mean(dim=(1, 2, 3))
    (grad_x,) = torch.autograd.grad(scores.sum(), x, create_graph=True)
    loss = scores.mean() + ((grad_x.flatten(1).norm(dim=1) - 1) ** 2).mean()
    loss.backward()
    return {"scores": scores.detach(), "x_grad": x.grad.detach(),
            **{f"grad.{n}": p.grad.detach().clone() for n, p in critic.named_parameters()},
            **{f"buffer.{n}": b.clone() for n, b in critic.named_buffers()}}


def _rn_l1(image: torch.Tensor, mask: torch.Tensor, pred: torch.Tensor) -> torch.Tensor:
    merged = pred * mask + image * (1 - mask)
    return (image - merged).abs().mean() / global_mean(mask.mean())


def _worker(rank: int, port: int, out_dir: str) -> None:
    import torch.distributed as dist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=WORLD)
    try:
        image, mask, pred = _batch()
        part = slice(2 * rank, 2 * rank + 2)
        critic = use_global_batch_norm(_critic())
        result = _step(critic, image[part])
        # Gradient contributions of each rank's loss sum across ranks as DDP / DeepSpeed would average them.
        for name, p in critic.named_parameters():
            dist.all_reduce(p.grad)
            result[f"grad.{name}"] = p.grad / WORLD
        pred_part = pred.detach()[part].requires_grad_(True)
        l1 = _rn_l1(image[part], mask[part], pred_part)
        l1.backward()
        result.update(world=torch.tensor(distributed_world()), l1=l1.detach(), l1_grad=pred_part.grad)
        torch.save(result, Path(out_dir) / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def test_global_statistics_on_two_gloo_workers_equal_one_process_on_the_whole_batch(tmp_path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(_worker, args=(port, str(tmp_path)), nprocs=WORLD, join=True)
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(WORLD)]
    assert all(int(r["world"]) == WORLD for r in ranks)

    image, mask, pred = _batch()
    whole = _step(_critic(), image)  # plain nn.BatchNorm2d on all 4 images in one process
    close = dict(rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(torch.cat([r["scores"] for r in ranks]), whole["scores"], **close)
    # The loss is a mean over the batch: each rank's mean is over half, so its input gradient is twice the
    # whole batch's (the averaging of parameter gradients across ranks divides it back).
    torch.testing.assert_close(torch.cat([r["x_grad"] for r in ranks]) / WORLD, whole["x_grad"], **close)
    for name in (k for k in whole if k.startswith(("grad.", "buffer."))):
        if name.endswith("num_batches_tracked"):
            assert all(int(r[name]) == int(whole[name]) for r in ranks)
            continue
        for r in ranks:
            torch.testing.assert_close(r[name], whole[name], **close, msg=lambda m: f"{name}: {m}")

    # RN's hole L1 with the all-reduced normaliser: the ranks' losses average to the official full-batch value.
    merged = pred.detach() * mask + image * (1 - mask)
    official = (image - merged).abs().mean() / mask.mean()
    torch.testing.assert_close(sum(r["l1"] for r in ranks) / WORLD, official, rtol=1e-6, atol=0)
    per_rank = [(image[p] - merged[p]).abs().mean() / mask[p].mean() for p in (slice(0, 2), slice(2, 4))]
    assert abs(float(sum(per_rank) / WORLD - official)) > 1e-3, "test batch must tell local from global normalisers"
    full = pred.detach().clone().requires_grad_(True)
    ((image - (full * mask + image * (1 - mask))).abs().mean() / mask.mean()).backward()
    torch.testing.assert_close(torch.cat([r["l1_grad"] for r in ranks]) / WORLD, full.grad, rtol=1e-5, atol=1e-9)


def test_global_batch_norm_is_plain_batch_norm_on_one_rank_and_keeps_the_state_dict():
    critic = _critic()
    converted = use_global_batch_norm(copy.deepcopy(critic))
    assert isinstance(converted[1], GlobalBatchNorm2d)
    assert converted.state_dict().keys() == critic.state_dict().keys()
    image = _batch()[0]
    torch.testing.assert_close(_step(converted, image)["scores"], _step(critic, image)["scores"], rtol=0, atol=0)
    assert global_mean(torch.tensor(0.25)) == 0.25


def test_lbam_official_recipe_gives_its_discriminator_global_batch_norm():
    from models.lbam import LBAMDiscriminator
    from pipeline.train.architectures.lbam import LBAMOfficialRecipe, LBAMSettings

    recipe = LBAMOfficialRecipe(LBAMSettings(allow_random_vgg=True), vgg=nn.Identity())
    with torch.device("meta"):
        D = recipe.prepare_discriminator(LBAMDiscriminator())
    norms = [m for m in D.modules() if isinstance(m, nn.BatchNorm2d)]
    assert len(norms) == 10 and all(isinstance(m, GlobalBatchNorm2d) for m in norms)
