"""A step's forward and backward replayed as one CUDA graph.

An eager step launches thousands of kernels from Python (ComfyUI's block code, the LoRA hooks,
the checkpoints' recomputes), and for SDXL and SD3.5 Medium the GPU waits on that host work
(bench/NOTES.md §2, §5). A CUDA graph records the kernels of one forward and backward once and
replays them with one launch. What changes between steps is copied into the graph's input buffers
first: the batch, its noise and its timesteps, all drawn eagerly as before, so the random streams
and a resumed run stay exactly those of an eager run. The optimizer step and gradient clipping
stay eager (a few fused kernels).

A graph replays fixed shapes, so there is one per input shape (aspect-ratio buckets, longer
prompts), each recorded the second time its shape comes: the first time runs eagerly and is the
warm-up a capture needs (compiled blocks compile, lazy CUDA state is made). All graphs of a run
share one memory pool; they never run at once.
"""

import ctypes
import logging
import warnings
from collections.abc import Callable

import torch

log = logging.getLogger(__name__)


def under_cuda_malloc_async(device: torch.device) -> bool:
    """Whether `device` allocates through PyTorch's cudaMallocAsync backend, which a ComfyUI server turns on
    unless started with `--disable-cuda-malloc` (`lora-train` runs PyTorch's own caching allocator).

    There a recording that fails must not be freed: the backend frees memory with `cudaFreeAsync`, which fails
    for the memory of a graph that never ran, inside a tensor's destructor, and that ends the process (a ComfyUI
    server, on the H200; bench/NOTES.md §14, §19). And recordings fail there that succeed under PyTorch's own
    allocator: compiled blocks' Triton kernels ("CUDA driver error: invalid argument", after which they did
    not launch eagerly either), swapped steps, and a plain stack of bf16 matmuls with a low-rank branch, whose
    backward invalidated its recording (bench/async_graphs.py). So under it the trainer records only the steps
    of families measured to record there (SDXL), of blocks not compiled, with every block on the card and room
    for the pool (Trainer.uses_cuda_graphs), and what a failed recording made is kept for the process's life."""
    return device.type == "cuda" and torch.cuda.get_allocator_backend() == "cudaMallocAsync"


# Under cudaMallocAsync, each failed recording's exception (its traceback holds the attempt's tensors) and the
# gradients it made: never let go (see under_cuda_malloc_async). A run stops recording after one failure. The list
# holds one reference more than anything gives back, so that the interpreter's teardown does not free them either
# (an abort as the process ends, seen on the GPU).
_FAILED_RECORDINGS: list[tuple[BaseException, list[torch.Tensor | None]]] = []
ctypes.pythonapi.Py_IncRef(ctypes.py_object(_FAILED_RECORDINGS))


def _signature(tensors: list[torch.Tensor]) -> tuple:
    return tuple((tuple(t.shape), t.dtype) for t in tensors)


class _Captured:
    def __init__(self, graph: torch.cuda.CUDAGraph, inputs: list[torch.Tensor], loss: torch.Tensor,
                 grads: list[torch.Tensor | None]):
        self.graph, self.inputs, self.loss, self.grads = graph, inputs, loss, grads


class GraphedSteps:
    """Runs `forward_backward(*tensors) -> loss` (which calls backward itself) eagerly the first
    time a shape comes, records it as a CUDA graph the second time and replays it from then on.
    After each call the parameters' `.grad` hold this step's gradients, as after an eager backward.

    Up to `max_shapes` input shapes get a graph; steps of further shapes run eagerly.

    A graph reads the model's weights where they were when it was recorded. `addresses()` says where
    they are now (data pointers); when that changes (ComfyUI moved the model off the GPU to sample
    with the VAE and back), the graphs are dropped and recorded again.
    """

    def __init__(self, parameters: list[torch.nn.Parameter], forward_backward: Callable[..., torch.Tensor],
                 addresses: Callable[[], tuple], max_shapes: int = 8):
        self.parameters = parameters
        self.forward_backward = forward_backward
        self.addresses = addresses
        self.max_shapes = max_shapes
        self._seen: set[tuple] = set()
        self._graphs: dict[tuple, _Captured] = {}
        self._pool = None
        self._recorded_at: tuple | None = None

    @property
    def graph_count(self) -> int:
        return len(self._graphs)

    def __call__(self, *tensors: torch.Tensor) -> torch.Tensor:
        if self._graphs and self.addresses() != self._recorded_at:
            log.info("the model's weights moved in memory; the training step is recorded again")
            self._drop_graphs()
        key = _signature(list(tensors))
        captured = self._graphs.get(key)
        if captured is None:
            if key not in self._seen or len(self._graphs) >= self.max_shapes:
                self._seen.add(key)
                return self._eager(tensors)
            captured = self._record(key, tensors)
            if captured is None:
                # Outside the failed recording's handler: its traceback would keep that attempt's memory.
                return self._eager_without_graphs(tensors)
        else:
            for buffer, tensor in zip(captured.inputs, tensors, strict=True):
                buffer.copy_(tensor)
            captured.graph.replay()
        for parameter, grad in zip(self.parameters, captured.grads, strict=True):
            parameter.grad = grad
        # The graph writes its loss into the same buffer at every replay.
        return captured.loss.clone()

    def _record(self, key: tuple, tensors) -> _Captured | None:
        """The step recorded as a graph for this shape, or None where it cannot be (the run then steps eagerly)."""
        try:
            return self._capture(key, tensors)
        except torch.OutOfMemoryError as error:
            # Recording holds a step's activations in the graphs' pool; on a full card (a second bucket's
            # graph beside the first) the run goes on eagerly instead of failing.
            self._keep_where_freeing_fails(error)
            log.warning("out of GPU memory while recording the training step as a CUDA graph; "
                        "graphs are dropped and steps run eagerly")
        except RuntimeError as error:
            # Something in the step cannot be recorded (a read on the host, an operation CUDA graphs do
            # not take): this run steps eagerly, as it would with cuda_graphs="off".
            self._keep_where_freeing_fails(error)
            message = str(error).strip()
            log.warning("the training step could not be recorded as a CUDA graph, steps run eagerly: %s",
                        message.splitlines()[0] if message else type(error).__name__)
        return None

    def _keep_where_freeing_fails(self, error: BaseException) -> None:
        """Under cudaMallocAsync, keeps what the failed recording made from being freed (under_cuda_malloc_async):
        its tensors, through the exception's traceback, and the gradients it wrote."""
        devices = {p.device for p in self.parameters}
        if any(under_cuda_malloc_async(device) for device in devices):
            _FAILED_RECORDINGS.append((error, [p.grad for p in self.parameters]))

    def _eager(self, tensors) -> torch.Tensor:
        try:
            return self.forward_backward(*tensors)
        except torch.OutOfMemoryError:
            if not self._graphs:
                raise
            # The graphs' pool keeps a recorded step's activations reserved beside this eager step's
            # (a new bucket's first batch): give the pool back and go on without graphs.
            log.warning("out of GPU memory beside the recorded CUDA graphs; they are dropped and steps run eagerly")
        return self._eager_without_graphs(tensors)

    def _eager_without_graphs(self, tensors) -> torch.Tensor:
        """Drops the graphs for the rest of the run and runs the step eagerly. Called after the failed
        attempt's exception is handled: its traceback would keep that attempt's activations alive."""
        self._stop_graphs()
        torch.cuda.empty_cache()
        return self.forward_backward(*tensors)

    def _stop_graphs(self) -> None:
        self._drop_graphs()
        self.max_shapes = 0

    def release(self) -> None:
        """Gives back the graphs and their memory (between steps, or the training session ends); shapes
        seen before are recorded again at their next step."""
        self._drop_graphs()
        torch.cuda.empty_cache()

    def _drop_graphs(self) -> None:
        # A graph's loss and gradients are emptied here, not left to whoever still holds them, so that the
        # memory returns to the pool now. cudaMallocAsync warns at each, in four lines, that memory a recording
        # allocated is freed outside it: allowed, and what is meant (4,203 warnings ended one SDXL node run).
        with torch.no_grad(), warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="Attempting uncaptured free of a captured allocation")
            for captured in self._graphs.values():
                for tensor in (captured.loss, *captured.grads):
                    if tensor is not None:
                        tensor.set_()
                captured.graph.reset()
        self._graphs.clear()
        self._pool = None
        # Gradients of a dropped graph or of a step that failed halfway must not be accumulated into.
        self._clear_gradients()

    def _clear_gradients(self) -> None:
        for parameter in self.parameters:
            parameter.grad = None

    def _capture(self, key: tuple, tensors) -> _Captured:
        inputs = [t.clone() for t in tensors]
        # Gradients made inside the capture live in the graph's pool; each replay rewrites them.
        self._clear_gradients()
        # The eager warm-up's cached blocks cannot serve the graph's private pool: hand them back first.
        torch.cuda.empty_cache()
        graph = torch.cuda.CUDAGraph()
        stream = torch.cuda.current_stream()
        try:
            # Thread-local: the run trains on a thread of its own beside ComfyUI's, whose CUDA calls
            # must not break the recording (nor fail because of it).
            with torch.cuda.graph(graph, pool=self._pool, capture_error_mode="thread_local"):
                loss = self.forward_backward(*inputs)
        finally:
            # A recording that fails can leave this thread on the recording's side stream.
            torch.cuda.set_stream(stream)
        if self._pool is None:
            self._pool = graph.pool()
        captured = _Captured(graph, inputs, loss, [p.grad for p in self.parameters])
        self._graphs[key] = captured
        self._recorded_at = self.addresses()
        log.info("recorded the training step as a CUDA graph for inputs %s", [tuple(t.shape) for t in tensors])
        # Recording runs no kernel: this step's work is the first replay.
        graph.replay()
        return captured
