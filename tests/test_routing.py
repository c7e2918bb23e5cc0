"""Routing equals merged weights, never writes weights, and never stays attached."""

import copy

import pytest
import torch
from torch import nn

from loratorio.lora import Dense, LowRank, OutputSlice, delta_weight
from loratorio.routing import Router, RoutingError, attached, routed

torch.manual_seed(0)


class PlainLinear(nn.Module):
    """A Linear-like layer that is not a torch.nn.Linear subclass (as in Forge)."""

    def __init__(self, cin, cout):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(cout, cin) / cin**0.5)
        self.bias = nn.Parameter(torch.randn(cout))

    def forward(self, x):
        return torch.nn.functional.linear(x, self.weight, self.bias)


def lowrank(cout, cin, r, kernel=None, scale=0.7):
    if kernel is None:
        return LowRank(torch.randn(r, cin), torch.randn(cout, r), scale)
    return LowRank(torch.randn(r, cin, *kernel), torch.randn(cout, r, 1, 1), scale)


def merged_copy(module, entry):
    other = copy.deepcopy(module)
    with torch.no_grad():
        other.weight += delta_weight(entry, other.weight.shape).to(other.weight.dtype)
        for piece in entry if isinstance(entry, list) else [entry]:
            if isinstance(piece, Dense) and piece.bias is not None:
                other.bias += piece.bias * piece.scale
    return other


def rel_err(a, b):
    return ((a - b).abs().max() / b.abs().max().clamp_min(1e-12)).item()


def check_rows(module, adapters, rows, x):
    """Every routed row block equals the module with that adapter merged; other rows are bit-identical."""
    state = {k: v.clone() for k, v in module.state_dict().items()}
    with torch.no_grad():
        base = module(x)
        with routed({"m": module}, [{"m": a} for a in adapters], rows):
            out = module(x)
        covered = torch.zeros(x.shape[0], dtype=torch.bool)
        for entry, r in zip(adapters, rows):
            if r is None:
                continue
            ref = merged_copy(module, entry)(x[r])
            assert rel_err(out[r], ref) < 1e-4
            covered[r] = True
        assert torch.equal(out[~covered], base[~covered])
    for k, v in module.state_dict().items():
        assert torch.equal(v, state[k])
    assert not attached(module)


@pytest.mark.parametrize("layer", ["torch", "plain"])
def test_linear_lowrank_rows_equal_merged(layer):
    module = nn.Linear(12, 10) if layer == "torch" else PlainLinear(12, 10)
    adapters = [lowrank(10, 12, 4), lowrank(10, 12, 2), lowrank(10, 12, 3)]
    x = torch.randn(8, 5, 12)
    check_rows(module, adapters, [slice(0, 2), slice(2, 4), slice(4, 6)], x)


def test_uneven_and_sparse_rows_and_inactive_adapter():
    module = nn.Linear(6, 7)
    adapters = [lowrank(7, 6, 2), lowrank(7, 6, 3), lowrank(7, 6, 1)]
    x = torch.randn(9, 6)
    check_rows(module, adapters, [slice(5, 6), None, slice(0, 3)], x)
    check_rows(module, adapters, [slice(1, 2), slice(3, 9), None], x)


@pytest.mark.parametrize("stride,padding,dilation", [(1, 1, 1), (2, 1, 1), (1, 0, 1), (2, 2, 2)])
def test_conv_lowrank_with_geometry(stride, padding, dilation):
    module = nn.Conv2d(5, 6, 3, stride=stride, padding=padding, dilation=dilation)
    adapters = [lowrank(6, 5, 3, kernel=(3, 3)), lowrank(6, 5, 2, kernel=(3, 3))]
    x = torch.randn(4, 5, 11, 9)
    check_rows(module, adapters, [slice(0, 2), slice(2, 4)], x)


def test_conv_1x1_with_linear_shaped_factors():
    module = nn.Conv2d(5, 6, 1)
    adapters = [lowrank(6, 5, 3), lowrank(6, 5, 2, kernel=(1, 1))]
    check_rows(module, adapters, [slice(0, 1), slice(1, 3)], torch.randn(3, 5, 4, 4))


def test_tucker_mid():
    module = nn.Conv2d(4, 6, 3, padding=1, stride=2)
    tucker = LowRank(torch.randn(3, 4, 1, 1), torch.randn(6, 3, 1, 1), 0.5, mid=torch.randn(3, 3, 3, 3))
    tucker2 = LowRank(torch.randn(2, 4, 1, 1), torch.randn(6, 2, 1, 1), 1.5, mid=torch.randn(2, 2, 3, 3))
    check_rows(module, [tucker, tucker2], [slice(0, 2), slice(2, 4)], torch.randn(4, 4, 8, 8))


def test_dense_linear_and_conv_with_bias():
    lin = nn.Linear(6, 5)
    dense = [Dense(torch.randn(5, 6), 0.3, bias=torch.randn(5)), Dense(torch.randn(5, 6), 2.0)]
    check_rows(lin, dense, [slice(0, 2), slice(2, 3)], torch.randn(3, 4, 6))
    conv = nn.Conv2d(3, 4, 3, padding=1)
    dense = [Dense(torch.randn(4, 3, 3, 3), 0.3, bias=torch.randn(4)), Dense(torch.randn(4, 3, 3, 3))]
    check_rows(conv, dense, [slice(0, 1), slice(1, 3)], torch.randn(3, 3, 6, 6))


def test_mixed_forms_on_one_module():
    module = nn.Linear(8, 9)
    adapters = [lowrank(9, 8, 2), Dense(torch.randn(9, 8), 0.1), [lowrank(9, 8, 2), lowrank(9, 8, 5)]]
    check_rows(module, adapters, [slice(0, 2), slice(2, 4), slice(4, 6)], torch.randn(6, 8))


def test_output_slice_packed_qkv():
    module = PlainLinear(8, 24)  # q, k, v packed, 8 features each
    q = OutputSlice(lowrank(8, 8, 2), 0, 8)
    v = OutputSlice(lowrank(8, 8, 3), 16, 8)
    other = OutputSlice(Dense(torch.randn(8, 8), 0.5), 8, 8)
    check_rows(module, [[q, v], other], [slice(0, 2), slice(2, 5)], torch.randn(5, 3, 8))


def test_fp16_and_bf16_inputs():
    for dtype in (torch.bfloat16, torch.float16):
        module = nn.Linear(16, 16).to(dtype)
        adapters = [lowrank(16, 16, 4), lowrank(16, 16, 4)]
        x = torch.randn(4, 16, dtype=dtype)
        with torch.no_grad(), routed({"m": module}, [{"m": a} for a in adapters], [slice(0, 2), slice(2, 4)]):
            out = module(x)
        ref = merged_copy(module.float(), adapters[1])(x[2:].float())
        module.to(dtype)
        assert out.dtype == dtype
        assert rel_err(out[2:].float(), ref) < 2e-2


def test_routing_removed_on_exception_and_keyboard_interrupt():
    module = nn.Linear(4, 4)
    for exc in (RuntimeError("boom"), KeyboardInterrupt()):
        with pytest.raises(type(exc)), routed({"m": module}, [{"m": lowrank(4, 4, 2)}], [slice(0, 1)]):
            assert attached(module)
            raise exc
        assert not attached(module)
    # the module can be routed again afterwards
    with routed({"m": module}, [{"m": lowrank(4, 4, 2)}], [slice(0, 1)]):
        module(torch.randn(1, 4))
    assert not attached(module)


def test_exception_inside_forward_removes_routing():
    module = nn.Linear(4, 4)
    with pytest.raises(RoutingError, match="do not fit a batch"), \
            routed({"m": module}, [{"m": lowrank(4, 4, 2)}], [slice(0, 8)]):
        module(torch.randn(3, 4))
    assert not attached(module)


def test_nesting_and_overlap_are_errors():
    module = nn.Linear(4, 4)
    router = Router({"m": module}, [{"m": lowrank(4, 4, 2)}, {"m": lowrank(4, 4, 2)}])
    with router.route([slice(0, 1), None]):
        with pytest.raises(RoutingError, match="already being routed"), router.route([None, slice(1, 2)]):
            pass
        assert attached(module)
    assert not attached(module)
    with pytest.raises(RoutingError, match="overlap"), router.route([slice(0, 3), slice(2, 4)]):
        pass
    with pytest.raises(RoutingError, match="entries for 2 adapters"), router.route([slice(0, 3)]):
        pass
    assert not attached(module)


def test_unknown_module_and_bad_kernel_are_clear_errors():
    with pytest.raises(RoutingError, match="not among the targets"):
        Router({"m": nn.Linear(4, 4)}, [{"x": lowrank(4, 4, 1)}])
    with pytest.raises(RoutingError, match="kernel"):
        Router({"m": nn.Conv2d(4, 4, 3)}, [{"m": lowrank(4, 4, 1, kernel=(1, 1))}])


def test_router_memory_holds_no_dense_expansion():
    module = nn.Linear(256, 256)
    adapters = [{"m": lowrank(256, 256, 16)} for _ in range(4)]
    loaded = sum(a["m"].nbytes for a in adapters)
    router = Router({"m": module}, adapters)
    with router.route([slice(i, i + 1) for i in range(4)]):
        module(torch.randn(4, 256))
    assert router.nbytes <= 2 * loaded
    assert router.nbytes < 256 * 256 * 4  # less than one dense delta


def test_adapter_on_several_row_blocks():
    module = nn.Linear(6, 5)
    adapters = [lowrank(5, 6, 2), lowrank(5, 6, 3)]
    x = torch.randn(10, 6)
    with torch.no_grad():
        base = module(x)
        with routed({"m": module}, [{"m": a} for a in adapters], [[slice(0, 2), slice(4, 6)], [slice(2, 4)]]):
            out = module(x)  # blocks 0:2, 2:4, 4:6 are equal and adjacent: one batched call with a repeat
        with routed({"m": module}, [{"m": a} for a in adapters], [[slice(0, 1), slice(7, 10)], slice(3, 5)]):
            uneven = module(x)
    for entry, blocks in ((adapters[0], [slice(0, 2), slice(4, 6)]), (adapters[1], [slice(2, 4)])):
        for r in blocks:
            assert rel_err(out[r], merged_copy(module, entry)(x[r])) < 1e-4
    assert torch.equal(out[6:], base[6:])
    for entry, r in ((adapters[0], slice(0, 1)), (adapters[0], slice(7, 10)), (adapters[1], slice(3, 5))):
        assert rel_err(uneven[r], merged_copy(module, entry)(x[r])) < 1e-4
    assert torch.equal(uneven[[1, 2, 5, 6]], base[[1, 2, 5, 6]])
    with pytest.raises(RoutingError, match="overlap"), \
            routed({"m": module}, [{"m": a} for a in adapters], [[slice(0, 3), slice(5, 6)], slice(2, 4)]):
        pass


def test_conv_1x1_equal_rows_run_as_one_pointwise_batch():
    module = nn.Conv2d(6, 5, 1)
    adapters = [lowrank(5, 6, 3, kernel=(1, 1)), lowrank(5, 6, 2), lowrank(5, 6, 4, kernel=(1, 1))]
    check_rows(module, adapters, [slice(0, 2), slice(2, 4), slice(4, 6)], torch.randn(7, 6, 5, 3))
    check_rows(module, adapters, [slice(2, 4), None, slice(0, 2)], torch.randn(4, 6, 5, 3))


def test_delta_weight_stays_on_the_factors_device():
    piece = lowrank(4, 3, 2)
    assert delta_weight(piece, (4, 3)).device == piece.down.device
    assert delta_weight([OutputSlice(piece, 2, 4)], (8, 3))[:2].abs().sum() == 0


def test_each_module_plans_a_row_layout_once_across_calls(monkeypatch):
    from loratorio import routing

    model = nn.Sequential(nn.Linear(6, 5), nn.Conv2d(5, 5, 1))
    targets = {"lin": model[0], "conv": model[1]}
    adapters = [{"lin": lowrank(5, 6, 3), "conv": lowrank(5, 5, 2, kernel=(1, 1))} for _ in range(2)]
    router = Router(targets, adapters)
    built = []
    original = routing._ModulePlan.schedule

    def counted(self, *args, **kwargs):
        built.append(self.name)
        return original(self, *args, **kwargs)

    monkeypatch.setattr(routing._ModulePlan, "schedule", counted)
    rows = [slice(2, 4), slice(4, 6)]
    x = torch.randn(6, 6)

    def run(x):
        return model[1](model[0](x)[:, :, None, None].expand(-1, -1, 2, 2).contiguous())

    with torch.no_grad():
        outs = []
        for _ in range(3):
            with router.route(rows):
                outs.append(run(x))
        assert sorted(built) == ["conv", "lin"]  # planned at the first call only
        assert all(torch.equal(o, outs[0]) for o in outs)
        with router.route([slice(0, 2), None]):  # another layout: planned again
            run(x)
        assert len(built) == 4
        for j, r in enumerate(rows):
            ref = copy.deepcopy(model)
            ref[0] = merged_copy(model[0], adapters[j]["lin"])
            ref[1] = merged_copy(model[1], adapters[j]["conv"])
            with torch.no_grad():
                want = ref[1](ref[0](x[r])[:, :, None, None].expand(-1, -1, 2, 2).contiguous())
            assert rel_err(outs[0][r], want) < 1e-5


def test_collected_errors_stop_the_routing_and_leave_other_rows_exact():
    """With ``errors``, a failing module's error is kept instead of raised; unrouted rows stay the module's own."""
    model = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 3))
    targets = {"a": model[0], "b": model[1]}
    router = Router(targets, [{"a": lowrank(4, 4, 2), "b": lowrank(3, 4, 2)}])
    x = torch.randn(4, 4)
    with torch.no_grad():
        base = model(x)
        errors: list = []
        with router.route([slice(2, 4)], errors=errors):
            routed_out = model(x)
        assert errors == [] and torch.equal(routed_out[:2], base[:2]) and not torch.equal(routed_out[2:], base[2:])
        first = next(p for p in router._plans if p.name == "a")
        first.run = lambda *args: (_ for _ in ()).throw(RuntimeError("injected inside a routed module"))
        with router.route([slice(2, 4)], errors=errors):
            out = model(x)
        with pytest.raises(RuntimeError, match="injected"), router.route([slice(2, 4)]):
            model(x)  # without ``errors`` the error propagates, as before
    assert len(errors) == 1 and "injected" in str(errors[0])
    assert torch.equal(out, base)  # no module was routed after the error: every row is the model's own
    assert not attached(model[0]) and not attached(model[1])


@pytest.mark.parametrize("make", [lambda: PlainLinear(6, 5), lambda: nn.Conv2d(6, 5, 3, padding=1)])
def test_a_span_shared_by_several_adapters_equals_all_of_them_merged(make):
    """The merged row of method ``joint``: adapters naming the same span act together there."""
    module = make()
    conv = isinstance(module, nn.Conv2d)
    a = lowrank(5, 6, 2, (3, 3) if conv else None)
    b = lowrank(5, 6, 3, (3, 3) if conv else None)
    x = torch.randn(6, 6, 4, 4) if conv else torch.randn(6, 6)
    both = merged_copy(merged_copy(module, a), b)
    with torch.no_grad():
        plain = module(x)
        with routed({"m": module}, [{"m": a}, {"m": b}], [[slice(0, 2), slice(4, 6)], [slice(2, 4), slice(4, 6)]]):
            out = module(x)
        assert rel_err(out[0:2], merged_copy(module, a)(x[0:2])) < 1e-4
        assert rel_err(out[2:4], merged_copy(module, b)(x[2:4])) < 1e-4
        assert rel_err(out[4:6], both(x[4:6])) < 1e-4
        assert not torch.equal(out[4:6], plain[4:6])
    router = Router({"m": module}, [{"m": a}, {"m": b}])
    with pytest.raises(RoutingError, match="overlap"), router.route([slice(0, 4), slice(2, 4)]):
        pass
    with pytest.raises(RoutingError, match="same rows twice"), router.route([[slice(0, 2), slice(0, 2)], None]):
        pass
    assert not attached(module)


def test_routing_chains_an_instance_forward_set_before_and_restores_it():
    """Another extension's instance forward runs inside the routed one and is put back afterwards."""
    module = nn.Linear(6, 5)
    theirs_calls = []

    def theirs(x):
        theirs_calls.append(1)
        return nn.Linear.forward(module, x) * 2

    module.forward = theirs
    a = lowrank(5, 6, 2)
    x = torch.randn(4, 6)
    with torch.no_grad():
        with routed({"m": module}, [{"m": a}], [slice(2, 4)]):
            out = module(x)
        assert vars(module)["forward"] is theirs
        expected = theirs(x)
        expected[2:] += x[2:] @ delta_weight(a, module.weight.shape).T
    assert torch.allclose(out, expected, atol=1e-5) and len(theirs_calls) == 2


def test_a_forward_set_on_top_meanwhile_stays_and_ours_passes_through():
    """Something wraps the routed forward during a block: its wrapper stays, ours switches off, routing works again."""
    module = nn.Linear(6, 5)
    router = Router({"m": module}, [{"m": lowrank(5, 6, 2)}])
    x = torch.randn(4, 6)
    with torch.no_grad():
        plain = module(x)
        with router.route([slice(0, 2)]):
            ours = module.forward
            module.forward = lambda inp: ours(inp)  # another extension wraps what it finds
            routed_out = module(x)
        assert torch.equal(module(x), plain)  # our forward inside their wrapper passes through now
        with router.route([slice(0, 2)]):
            again = module(x)
        assert torch.allclose(again, routed_out)
        assert torch.equal(module(x), plain)
    assert not torch.equal(routed_out[:2], plain[:2]) and torch.equal(routed_out[2:], plain[2:])


def test_other_forward_hooks_see_the_routed_output():
    """The deltas are part of the layer's output, as merged weights would be, before any forward hook runs."""
    module = nn.Linear(6, 5)
    a = lowrank(5, 6, 2)
    seen = []
    handle = module.register_forward_hook(lambda _m, _args, out: seen.append(out.clone()))
    x = torch.randn(2, 6)
    with torch.no_grad(), routed({"m": module}, [{"m": a}], [slice(0, 2)]):
        out = module(x)
    handle.remove()
    assert torch.equal(seen[0], out) and rel_err(out, merged_copy(module, a)(x)) < 1e-4


def test_a_route_block_keeps_no_new_objects_for_the_garbage_collector():
    """After the first block, entering a route leaves (nearly) nothing new alive for the collector to track.

    Each object alive during a step counts towards the collector's thresholds; with one
    per module per block, full collections over all of a WebUI's objects would land on
    the steps.
    """
    import gc

    modules = {f"m{i}": nn.Linear(8, 8) for i in range(100)}
    router = Router(modules, [{name: lowrank(8, 8, 2) for name in modules} for _ in range(2)])
    model = nn.Sequential(*modules.values())
    x = torch.randn(4, 8)
    with torch.no_grad():
        with router.route([slice(0, 2), slice(2, 4)]):
            model(x)  # plans and overrides are made once here
        gc.collect()
        before = len(gc.get_objects())
        with router.route([slice(0, 2), slice(2, 4)]):
            model(x)
            inside = len(gc.get_objects())
    assert inside - before < len(modules) // 2, inside - before  # a handle and a closure per module before
    assert not any(attached(m) for m in modules.values())


@pytest.mark.parametrize("rank", [2, 8, 16, 40])
def test_every_linear_form_equals_merged(rank):
    """Narrow ranks (transposed rank product on a CPU), wide ranks (factors) and ranks where the product is cheaper."""
    module = nn.Linear(48, 40)
    adapters = [lowrank(40, 48, rank), lowrank(40, 48, rank)]
    x = torch.randn(6, 7, 48)
    check_rows(module, adapters, [slice(0, 2), slice(2, 4)], x)
    both = merged_copy(merged_copy(module, adapters[0]), adapters[1])
    with torch.no_grad(), routed({"m": module}, [{"m": a} for a in adapters], [[slice(0, 2), slice(4, 6)],
                                                                                 [slice(2, 4), slice(4, 6)]]):
        out = module(x)
    assert rel_err(out[4:6], both(x[4:6])) < 1e-4
