"""The quantum parameter generator, usable on its own (no PEFT config or tuner needed).

A circuit of N qubits (``circuit``: defined once in Qiskit terms), simulated by one of the ``backends`` (exact
statevector with a compiled CPU kernel; Qiskit Aer exact, sampled or noisy), optionally with generative
interpolation of unobserved states (``interpolation``), gives 2^N probabilities; a mapping MLP turns each basis
state's row into a chunk of numbers; the chunks fill named tensor shapes (:class:`TensorSpec`)::

    from peft_qpa.generator import GeneratorConfig, QPAGenerator, TensorSpec
    generator = QPAGenerator.from_config(GeneratorConfig(qnn_depth=2, chunk_size=16), [TensorSpec("w", (8, 8))])
    tensors = generator.split(generator.generate())  # {"w": an 8 x 8 tensor, differentiable}
"""

from .circuit import ANSATZES, build_ansatz, n_qubits_for
from .config import GeneratorConfig
from .generator import QPAGenerator, TensorSpec

__all__ = ["ANSATZES", "GeneratorConfig", "QPAGenerator", "TensorSpec", "build_ansatz", "n_qubits_for"]
