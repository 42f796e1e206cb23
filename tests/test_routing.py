"""deradiff.routing: row-group routing of a mixed batch through peft LoRA layers."""

import pytest
import torch
from conftest import build_tiny_sd15

from deradiff.models import adapters_disabled, add_lora, tuner_layers
from deradiff.routing import RowGroupRouter

pytestmark = pytest.mark.usefixtures("one_thread")

# Attention projections (Linear), proj_in/out (1x1 Conv2d: stacked) and the resnets' 3x3 conv1
# (not stackable: sliced), so one call exercises both routes.
TARGETS = ["to_q", "to_k", "to_v", "to_out.0", "proj_in", "proj_out", "conv1"]


def _randomize(unet, adapter: str, seed: int, strength: float = 0.3) -> None:
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in unet.named_parameters():
            if f"lora_B.{adapter}" in name:
                p.copy_(torch.randn(p.shape, generator=gen) * strength)


@pytest.fixture
def unet(tmp_path):
    """A tiny SD1.5 UNet with adapters "a" (on every target) and "b" (attention only), "a" active."""
    model = build_tiny_sd15(tmp_path).unet
    add_lora(model, rank=4, alpha=8, target_modules=TARGETS, adapter_name="a")
    add_lora(model, rank=2, target_modules=["to_q", "to_v"], adapter_name="b")
    _randomize(model, "a", 1)
    _randomize(model, "b", 2)
    model.set_adapters(["a"])
    return model


def _inputs(n=2):
    gen = torch.Generator().manual_seed(0)
    return torch.randn(n, 4, 16, 16, generator=gen), torch.randn(n, 16, 32, generator=gen)


def _alone(unet, name, x, ehs):
    """The model's output with adapter `name` alone (None: the base model)."""
    layers = tuner_layers(unet)
    if name is None:
        with adapters_disabled(unet, layers):
            return unet(x, 400, encoder_hidden_states=ehs).sample
    unet.set_adapters([name])
    try:
        return unet(x, 400, encoder_hidden_states=ehs).sample
    finally:
        unet.set_adapters(["a"])


def _routed(unet, router, names, x, ehs):
    """The blocks of one routed call on len(names) copies of the rows, and the route counts."""
    n = x.shape[0]
    groups = len(names)
    with router.route(names, n) as counts:
        out = unet(torch.cat([x] * groups), torch.tensor([400] * (n * groups)),
                   encoder_hidden_states=torch.cat([ehs] * groups)).sample
    return [out[g * n:(g + 1) * n] for g in range(groups)], counts


@torch.no_grad()
@pytest.mark.parametrize("stack_weights", [True, False])
def test_each_block_equals_its_adapter_alone_and_every_route_is_taken(unet, stack_weights):
    x, ehs = _inputs()
    router = RowGroupRouter(tuner_layers(unet), stack_weights=stack_weights)
    names = [None, "a", "b"]
    blocks, counts = _routed(unet, router, names, x, ehs)
    for name, block in zip(names, blocks, strict=True):
        torch.testing.assert_close(block, _alone(unet, name, x, ehs), atol=2e-5, rtol=0)
    assert counts.sliced > 0 and counts.peft == 0 and counts.base == 0  # 3x3 conv1 layers: sliced either way
    if stack_weights:  # 1x1 proj convs and attention Linears stacked: a copy of their weights per block
        assert counts.stacked > 0 and len(router._stacks) == counts.stacked
    else:  # sliced: no weight copies
        assert counts.stacked == 0 and not router._stacks
    assert (blocks[1] - blocks[0]).abs().max() > 1e-2 and (blocks[2] - blocks[0]).abs().max() > 1e-2


def test_weights_are_stacked_by_default_on_the_cpu_only(unet):
    assert RowGroupRouter(tuner_layers(unet)).stack_weights
    unet.to("meta")  # any other device (the meta one needs no accelerator): sliced, no weight copies
    assert not RowGroupRouter(tuner_layers(unet)).stack_weights


@torch.no_grad()
def test_a_layer_without_the_called_adapters_runs_its_base_alone(unet):
    """Adapter "a" stays active on every layer, but a call routing only [None, "b"] must not let it
    leak into layers that lack "b" (peft's per-row routing would also skip it there)."""
    x, ehs = _inputs()
    blocks, counts = _routed(unet, RowGroupRouter(tuner_layers(unet)), [None, "b"], x, ehs)
    torch.testing.assert_close(blocks[1], _alone(unet, "b", x, ehs), atol=2e-5, rtol=0)
    torch.testing.assert_close(blocks[0], _alone(unet, None, x, ehs), atol=2e-5, rtol=0)
    assert counts.base > 0


@torch.no_grad()
def test_stacks_follow_changed_weights_and_scaling(unet):
    x, ehs = _inputs()
    router = RowGroupRouter(tuner_layers(unet))
    before, _ = _routed(unet, router, [None, "a"], x, ehs)
    _randomize(unet, "a", seed=7)  # in place: the version counters move
    after, _ = _routed(unet, router, [None, "a"], x, ehs)
    torch.testing.assert_close(after[1], _alone(unet, "a", x, ehs), atol=2e-5, rtol=0)
    assert (after[1] - before[1]).abs().max() > 1e-2
    unet.set_adapters(["a"], weights=[0.25])  # peft's scaling, not the weights
    try:
        scaled, _ = _routed(unet, router, [None, "a"], x, ehs)
        torch.testing.assert_close(scaled[1], _alone_at_current_scale(unet, x, ehs), atol=2e-5, rtol=0)
    finally:
        unet.set_adapters(["a"], weights=[1.0])
    assert (scaled[1] - after[1]).abs().max() > 1e-3


def _alone_at_current_scale(unet, x, ehs):
    return unet(x, 400, encoder_hidden_states=ehs).sample


def test_with_autograd_on_every_adapted_layer_takes_peft_route_and_gradients_reach_the_lora(unet):
    x, ehs = _inputs(1)
    with torch.no_grad():
        expected = _alone(unet, "a", x, ehs)
    router = RowGroupRouter(tuner_layers(unet))
    blocks, counts = _routed(unet, router, [None, "a"], x, ehs)
    assert counts.stacked == 0 and counts.peft > 0
    torch.testing.assert_close(blocks[1].detach(), expected, atol=2e-5, rtol=0)
    blocks[1].square().mean().backward()
    grads = [p.grad for n, p in unet.named_parameters() if "lora_A.a" in n]
    assert grads and all(g is not None for g in grads)


@torch.no_grad()
def test_disabled_adapters_give_the_base_on_every_block(unet):
    x, ehs = _inputs()
    layers = tuner_layers(unet)
    with adapters_disabled(unet, layers):
        blocks, counts = _routed(unet, RowGroupRouter(layers), [None, "a"], x, ehs)
    assert counts.stacked == counts.peft == 0
    torch.testing.assert_close(blocks[1], blocks[0], atol=1e-6, rtol=0)


@torch.no_grad()
def test_layers_get_their_own_forward_back(unet):
    layers = tuner_layers(unet)
    marker = layers[0].forward  # a bound method; stored as an instance attribute it must survive
    layers[0].forward = marker
    x, ehs = _inputs()
    _routed(unet, RowGroupRouter(layers), [None, "a"], x, ehs)
    assert layers[0].__dict__["forward"] is marker
    assert all("forward" not in layer.__dict__ for layer in layers[1:])


@torch.no_grad()
def test_dropout_in_train_mode_is_left_to_peft(tmp_path):
    model = build_tiny_sd15(tmp_path).unet
    add_lora(model, rank=4, target_modules=["to_q", "to_v"], dropout=0.5, adapter_name="a")
    model.train()
    x, ehs = _inputs()
    _, counts = _routed(model, RowGroupRouter(tuner_layers(model)), [None, "a"], x, ehs)
    assert counts.stacked == 0 and counts.peft > 0
    model.eval()
    _, counts = _routed(model, RowGroupRouter(tuner_layers(model)), [None, "a"], x, ehs)
    assert counts.stacked > 0


def test_bf16_merged_weights_lose_no_more_than_peft_routing(unet):
    """Merged weights are rounded to bf16 once, as fusing a LoRA is. The realigned difference
    aligned - reference must stay as close to the fp32 model's as peft's route gets in bf16
    (measured: 0.049 vs 0.125 max error on a max difference of 1.58)."""
    x, ehs = _inputs()
    with torch.no_grad():
        exact = _alone(unet, "a", x, ehs) - _alone(unet, None, x, ehs)
    unet.to(torch.bfloat16)
    x, ehs = x.bfloat16(), ehs.bfloat16()
    layers = tuner_layers(unet)
    with torch.no_grad():
        blocks, counts = _routed(unet, RowGroupRouter(layers), [None, "a"], x, ehs)
    peft_blocks, _ = _routed(unet, RowGroupRouter(layers), [None, "a"], x, ehs)  # autograd on: peft's route
    assert counts.stacked > 0
    error = ((blocks[1] - blocks[0]).float() - exact).abs().max()
    peft_error = ((peft_blocks[1] - peft_blocks[0]).detach().float() - exact).abs().max()
    assert 0 < error <= peft_error


def test_rows_not_in_whole_groups_are_refused(tmp_path):
    model = build_tiny_sd15(tmp_path).unet
    add_lora(model, rank=4, target_modules=["to_q", "proj_in"], adapter_name="a")  # stacked layers only
    x, ehs = _inputs(3)
    router = RowGroupRouter(tuner_layers(model))
    with torch.no_grad(), router.route([None, "a"], 2), pytest.raises(RuntimeError, match="multiple of the 2 row groups"):
        model(x, 400, encoder_hidden_states=ehs)


@torch.no_grad()
def test_an_embedding_lora_is_routed_by_peft_not_dropped():
    """LoRA on an nn.Embedding keeps its weights in lora_embedding_A/B: its adapter must still apply
    to its row block (through peft's route), not be taken for absent."""
    from peft import LoraConfig, inject_adapter_in_model

    model = torch.nn.Sequential(torch.nn.Embedding(10, 8), torch.nn.Linear(8, 4))
    inject_adapter_in_model(LoraConfig(r=2, target_modules=["0", "1"], init_lora_weights=False), model,
                            adapter_name="a")
    tokens = torch.tensor([[1, 2, 3], [4, 5, 6]])
    layers = tuner_layers(model)
    expected = model(tokens)
    with adapters_disabled(model, layers):
        base = model(tokens)
    with RowGroupRouter(layers).route([None, "a"], 2) as counts:
        out = model(torch.cat([tokens, tokens]))
    assert counts.peft == 1 and counts.stacked == 1 and counts.base == 0
    torch.testing.assert_close(out[2:], expected, atol=1e-6, rtol=0)
    torch.testing.assert_close(out[:2], base, atol=1e-6, rtol=0)
    assert (expected - base).abs().max() > 1e-3
