"""The dtypes MindSpore inferred for the ops of the graphs it compiled.

Type inference accepts dtypes that a device may have no kernel for: Conv3D infers fp32 and bf16 as
readily as fp16, while Ascend's Conv3d takes fp16 only. A compile check that must pin an op's dtype
reads the graph that MindSpore hands to the backend: the "validate" IR, written after inference and
graph optimisation, before kernel selection (so also when kernel selection then fails).
"""

import contextlib
import os
import re
import tempfile
from pathlib import Path

import mindspore as ms

# A node line, `%3(out) = Conv3D(%1, %2) {attributes}`, is followed by its types:
# `: (<Tensor[Float16], (1, 4, 4, 8, 8)>, <Tensor[Float16], ...>) -> (<Tensor[Float16], ...>)`.
_NODE = re.compile(r"= (?:PrimFunc_)?(\w+)\(.*\n\s*: \((.*)\) -> \((.*)\)\n")
_TENSOR = re.compile(r"Tensor\[(\w+)\]")


class InferredTypes:
    def __init__(self):
        self.nodes = []  # (op, input tensor dtypes, output tensor dtypes)

    def of(self, op: str) -> list[tuple[tuple[str, ...], tuple[str, ...]]]:
        """(input tensor dtypes, output tensor dtypes) of every `op` node, e.g. (("Float16", "Float16"), ("Float16",))."""
        return [(inputs, outputs) for name, inputs, outputs in self.nodes if name == op]


@contextlib.contextmanager
def inferred_types():
    """Collect the inferred types of every graph compiled inside; read them with `.of(op)` after the block."""
    types = InferredTypes()
    saved = os.environ.get("MS_DEV_DUMP_IR_PASSES")
    with tempfile.TemporaryDirectory() as directory:
        os.environ["MS_DEV_DUMP_IR_PASSES"] = "validate"  # only this stage: all stages cost ~2x the compile time
        ms.set_context(save_graphs=1, save_graphs_path=directory)
        try:
            yield types
        finally:
            ms.set_context(save_graphs=0)
            if saved is None:
                del os.environ["MS_DEV_DUMP_IR_PASSES"]
            else:
                os.environ["MS_DEV_DUMP_IR_PASSES"] = saved
            for path in sorted(Path(directory).glob("*validate*.ir")):
                for match in _NODE.finditer(path.read_text()):
                    types.nodes.append((match[1], tuple(_TENSOR.findall(match[2])), tuple(_TENSOR.findall(match[3]))))
