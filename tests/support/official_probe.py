"""The official RN training loop as a reference: rebuild its networks and replay it through holefill's ``gan_step``.

``tests/data/rn_train_step_T.pt`` holds three iterations of the official RN loop (``geekyutao/RN`` ``main.py``
at b0a9476, CPU float32, batch 2 at 64², Adam G 1e-4 / D 1e-5, betas (0, 0.9)) run under the closed-form
pattern weights of case "T" (``tests/support/pattern_weights.py``): each iteration's losses, G's prediction and the
parameters afterwards. Used in-process by ``tests/test_official_mode.py`` (plain PyTorch optimisers) and as a
subprocess for DeepSpeed (a DeepSpeed process group must not leak into the pytest process)::

    python tests/support/official_probe.py PORT 0 2      # ZeRO stages to replay; prints RESULT {json}

Threads are pinned to 1: before iteration 3 one RN-L response sits 5.8e-5 from its 0.8 threshold (the file's
``sa_margin_before_iter``), and Adam with β1 = 0 turns rounding noise in near-zero gradients into full-size steps,
so the reduction order of a multi-threaded convolution (or PyTorch's fused Adam kernel, which the DeepSpeed engines
use) can move that pixel to the other region and change iteration 3's prediction by 3e-4 (two threads) to 8.5e-3
(fused Adam) while every loss stays within 6e-6. One thread with the default Adam lands on the reference side.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Any, Callable

if not __package__:  # run by path (python tests/support/official_probe.py): tests/ on sys.path, for `support`
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

REFERENCE_FILE = Path(__file__).resolve().parents[1] / "data" / "rn_train_step_T.pt"
# reference loss name -> holefill log name
LOSS_NAMES = {"d_loss": "d_loss", "d_real": "d_real", "d_fake": "d_fake", "g_loss": "g_loss", "g_l1": "g_l1", "g_gan": "g_adv"}


def load_reference() -> dict[str, Any]:
    """The reference file's contents (``meta``, ``inputs``, ``losses``, ``pred``, ``full``, ``clean_variant``, ...)."""
    return torch.load(REFERENCE_FILE, weights_only=True)


def reference_networks() -> tuple[torch.nn.Module, torch.nn.Module]:
    """RN's G and training D (logits) with the reference's starting weights, loaded through the official converter."""
    from support.pattern_weights import official_pattern_state_dict

    from models.convert import from_official
    from models.rn import RNDiscriminator, RNGenerator

    G, D = RNGenerator(), RNDiscriminator(use_sigmoid=False)
    G.load_state_dict(from_official("rn", "generator", official_pattern_state_dict("rn", "generator", "T")))
    D.load_state_dict(from_official("rn", "discriminator", official_pattern_state_dict("rn", "discriminator", "T")))
    return G, D


def replay(recipe: Any, G: torch.nn.Module, D: Any, update_d: Callable, update_g: Callable, steps: int = 3) -> dict[str, Any]:
    """Run ``steps`` holefill GAN steps on the reference batch; losses (reference names), predictions, D after."""
    from pipeline.train.recipes import gan_step, logs_to_floats

    ref = load_reference()
    image, mask = ref["inputs"]["gt"], ref["inputs"]["mask"]
    module = G.module if hasattr(G, "module") else G
    predictions: list[torch.Tensor] = []
    hook = module.register_forward_hook(lambda _m, _i, out: predictions.append(out.detach().clone()))
    losses = []
    try:
        for _ in range(steps):
            logs = logs_to_floats(gan_step(recipe, G, D, image, mask, update_d, update_g))
            losses.append({ref_name: logs[name] for ref_name, name in LOSS_NAMES.items()})
    finally:
        hook.remove()
    d_module = D.engine.module if hasattr(D, "engine") else D
    return {"losses": losses, "pred": predictions, "D": {k: v.detach().clone() for k, v in d_module.state_dict().items()}}


def replay_with_torch(recipe: Any, steps: int = 3, fused: bool | None = None) -> dict[str, Any]:
    """The reference loop through ``gan_step`` with plain ``torch.optim.Adam`` (the recipe's settings; ``fused``:
    PyTorch's fused kernel, which the DeepSpeed engines use)."""
    from pipeline.train.recipes import torch_updater

    G, D = reference_networks()
    D = recipe.prepare_discriminator(D)
    update_d = torch_updater(recipe.discriminator_optimizer.build(D.parameters(), fused=fused))
    update_g = torch_updater(recipe.generator_optimizer.build(G.parameters(), fused=fused))
    return replay(recipe, G, D, update_d, update_g, steps)


def replay_with_deepspeed(recipe: Any, zero_stage: int, steps: int = 3) -> dict[str, Any]:
    """The reference loop through ``gan_step`` on holefill's DeepSpeed engines (fp32, one rank)."""
    import torch.distributed as dist

    from pipeline.train.config import DeepSpeedSettings
    from pipeline.train.engines import DiscriminatorCaller, build_engines, step_updater

    G, D = reference_networks()
    engines = build_engines(
        recipe, G, D, DeepSpeedSettings(zero_stage=zero_stage, precision="fp32"),
        micro_batch_size=2, world_size=dist.get_world_size(), steps_per_epoch=10_000, device=torch.device("cpu"),
    )
    return replay(
        recipe, engines.generator, DiscriminatorCaller(engines.discriminator),
        step_updater(engines.discriminator), step_updater(engines.generator), steps,
    )


def deviations(result: dict[str, Any], reference: dict[str, Any] | None = None) -> dict[str, Any]:
    """Largest |holefill − official| per iteration: losses, prediction, and D's weights after the last step.

    D's spectral-norm vectors (``weight_u``/``weight_v``) are left out: one power iteration per forward from the
    weights, they amplify the weights' rounding drift several times and carry no information of their own."""
    ref = reference or load_reference()
    out = []
    for i, losses in enumerate(result["losses"]):
        full = ref["full"][i]["D"]
        out.append({
            "loss": max(abs(losses[name] - ref["losses"][name][i]) for name in LOSS_NAMES),
            "pred": float((result["pred"][i] - ref["pred"][i]).abs().max()),
            "D": max(float((result["D"][k] - full[k]).abs().max()) for k in full if k.endswith("weight_orig"))
            if i == len(result["losses"]) - 1 else None,
        })
    return {"per_iteration": out, "losses": result["losses"]}


def main() -> None:
    import torch.distributed as dist

    port, *stages = sys.argv[1:]
    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=port, RANK="0", WORLD_SIZE="1", LOCAL_RANK="0")
    dist.init_process_group("gloo", rank=0, world_size=1)
    from pipeline.train.engines import init_distributed
    from pipeline.train.spec import build_recipe

    init_distributed(False)
    plain = replay_with_torch(build_recipe("rn", official=True), fused=True)
    out = {}
    for stage in stages:
        try:
            result = replay_with_deepspeed(build_recipe("rn", official=True), int(stage))
        except Exception as exc:  # reported, so the test shows which stage failed and why
            out[stage] = {"error": f"{type(exc).__name__}: {exc}"}
            continue
        out[stage] = deviations(result)
        # The same loop with plain PyTorch and the engines' fused Adam: what DeepSpeed itself changes.
        out[stage]["vs_plain_fused"] = {
            "pred": [float((a - b).abs().max()) for a, b in zip(result["pred"], plain["pred"])],
            "D": max(float((result["D"][k] - plain["D"][k]).abs().max()) for k in plain["D"]),
        }
    print("RESULT " + json.dumps(out))
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
