"""ZeroArena: slices handed out in a pass are zero, whatever the previous pass wrote into them."""
import torch

from athena_runtime.kernels.zero_arena import ZeroArena

CPU = torch.device("cpu")


def test_slices_are_zero_every_pass_and_distinct():
    arena = ZeroArena(capacity=4096, device_types=("cpu",))
    for step in range(4):
        with arena.forward(CPU):
            a = arena.zeros((1, 3, 10), CPU)
            b = arena.zeros((2, 7), CPU)
            assert a.shape == (1, 3, 10) and b.shape == (2, 7)
            assert torch.count_nonzero(a) == 0 and torch.count_nonzero(b) == 0
            a.fill_(step + 1.0)  # dirty them, as the kernels' atomics do
            b.fill_(-(step + 1.0))
            assert torch.all(a == step + 1.0) and torch.all(b == -(step + 1.0))  # no overlap
        if step >= 1:  # from the second pass on, both live in the arena's buffer
            assert a.data_ptr() != b.data_ptr()
            assert a.untyped_storage().data_ptr() == b.untyped_storage().data_ptr()


def test_outside_a_pass_and_overflow_give_fresh_zeros():
    arena = ZeroArena(capacity=128, device_types=("cpu",))
    t = arena.zeros((5,), CPU)
    assert torch.count_nonzero(t) == 0
    for _ in range(2):
        with arena.forward(CPU):
            small = arena.zeros((10,), CPU)
            big = arena.zeros((1000,), CPU)  # over capacity: a fresh tensor
            assert torch.count_nonzero(small) == 0 and torch.count_nonzero(big) == 0
            small.fill_(3.0)
            big.fill_(3.0)
    assert big.untyped_storage().data_ptr() != small.untyped_storage().data_ptr()


def test_growing_pass_uses_fresh_zeros_for_the_new_part():
    arena = ZeroArena(capacity=4096, device_types=("cpu",))
    with arena.forward(CPU):
        arena.zeros((64,), CPU).fill_(1.0)
    with arena.forward(CPU):  # this pass asks for more than the last one zeroed
        first = arena.zeros((64,), CPU)
        extra = arena.zeros((64,), CPU)
        assert torch.count_nonzero(first) == 0 and torch.count_nonzero(extra) == 0
        extra.fill_(2.0)
    with arena.forward(CPU):
        arena.zeros((64,), CPU)
        again = arena.zeros((64,), CPU)
        assert torch.count_nonzero(again) == 0


def test_nested_pass_and_cpu_default_are_plain_zeros():
    arena = ZeroArena(capacity=4096)  # cuda only: a CPU pass is a no-op
    with arena.forward(CPU):
        t = arena.zeros((4, 4), CPU)
        assert torch.count_nonzero(t) == 0


def test_buffer_made_in_inference_mode_is_usable_outside_it():
    arena = ZeroArena(capacity=256, device_types=("cpu",))
    for mode in (True, False, True):  # first pass in inference mode (load-time calibration), then not
        with torch.inference_mode(mode):
            for _ in range(2):
                with arena.forward(CPU):
                    t = arena.zeros((8,), CPU)
                    assert torch.count_nonzero(t) == 0
                    t.add_(1.0)
