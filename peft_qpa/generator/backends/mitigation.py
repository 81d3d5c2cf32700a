"""Per-qubit (tensored) readout-error mitigation of measured probability vectors.

A device's readout error is modelled as one 2x2 confusion matrix per measured qubit, ``R_q[true, measured]`` =
P(qubit q is read as ``measured`` | it was in ``true``), acting independently on each qubit: a measured
distribution is ``p_measured = p_true · (R_{N-1} ⊗ … ⊗ R_0)`` (Qiskit little-endian order, bit q of the
index is qubit q). :func:`apply_readout_error` applies that map, :func:`mitigate` inverts it:

1. **Unmixing** (:func:`unmix`): each ``R_q^{-1}`` is applied along its qubit's axis of the 2x...x2-reshaped
   vector, O(N·2^N) work and memory, never a 2^N x 2^N matrix. The result is exact for exact probabilities
   but is a *quasi*-probability vector (it sums to 1 and may have negative entries) when the input holds
   finite-shot frequencies.
2. **Projection** back onto the probability simplex (:func:`project_to_simplex`), by default ``"nearest"``: the
   probability vector nearest in Euclidean distance, as in Smolin, Gambetta and Smith, "Efficient method for
   computing the maximum-likelihood quantum state from measurements with additive Gaussian noise", Physical
   Review Letters 108, 070502 (2012), arXiv:1106.5458 (their algorithm on the eigenvalues of a density matrix,
   here on a diagonal one: sort, zero the most negative entries and spread their mass evenly over the rest until
   none is negative). It leaves a vector that is already a probability vector unchanged. ``"clip"`` sets the
   negative entries to zero and renormalises instead (simpler, moves mass proportionally).

Where the matrices come from: :func:`readout_matrices` takes a fake IBM device name, a
``qiskit_aer.noise.NoiseModel``, a device ``Target`` or a backend with a ``.target``, and the physical qubit of
each logical qubit (``AerProbabilities.physical_qubits``). From a ``Target`` the error of ``measure`` on a qubit
is read as a symmetric flip probability (``target['measure'][(q,)].error``), as Aer's
``basic_device_readout_errors`` builds it, unless the instruction carries ``prob_meas1_prep0`` /
``prob_meas0_prep1``.

numpy only at import; Qiskit is imported inside the functions that read a device or a noise model.
"""

from __future__ import annotations

from typing import Any, Optional, Sequence

import numpy as np

PROJECTIONS = ("nearest", "clip")

# A confusion matrix whose inverse amplifies by more than this is refused: the qubit's readout carries (almost)
# no information (flip probability near 0.5), and unmixing would blow up its shot noise.
MAX_CONDITION_NUMBER = 1e6

Matrices = Sequence[Optional[np.ndarray]]


# --------------------------------------------------------------------------------------------------
# The forward map and its inverse
# --------------------------------------------------------------------------------------------------


def apply_readout_error(probs: np.ndarray, matrices: Matrices) -> np.ndarray:
    """Apply independent per-qubit readout errors to probability vectors ``probs[..., 2^N]``.

    ``matrices[q][a, b]`` = P(measure b | qubit q is in a); ``None`` = ideal readout. Linear, so it is applied to the
    shifted probabilities of a parameter-shift Jacobian as well. Leading batch dimensions are kept."""
    probs = np.asarray(probs)
    n = len(matrices)
    if probs.shape[-1] != 2**n:
        raise ValueError(f"probs has {probs.shape[-1]} entries per vector, but {n} matrices need 2^{n} = {2**n}.")
    lead = probs.shape[:-1]
    out = probs.reshape(lead + (2,) * n)
    # Qubit q is bit q of the index, i.e. axis (len(lead) + n - 1 - q) of the reshaped array.
    for q, matrix in enumerate(matrices):
        if matrix is None:
            continue
        axis = len(lead) + n - 1 - q
        out = np.moveaxis(np.tensordot(out, matrix, axes=([axis], [0])), -1, axis)
    return out.reshape(probs.shape)


def inverse_matrices(matrices: Matrices) -> list[Optional[np.ndarray]]:
    """``R_q^{-1}`` per qubit (``None`` stays ``None``). A ``ValueError`` names a qubit whose readout cannot be
    inverted (singular, or condition number above :data:`MAX_CONDITION_NUMBER`: readout flips near 50 %)."""
    out = []
    for q, matrix in enumerate(matrices):
        if matrix is None:
            out.append(None)
            continue
        matrix = np.asarray(matrix, dtype=np.float64)
        if matrix.shape != (2, 2) or not np.all(np.isfinite(matrix)):
            raise ValueError(f"The readout matrix of qubit {q} must be a finite 2x2 array, got {matrix!r}.")
        cond = np.linalg.cond(matrix)
        if not np.isfinite(cond) or cond > MAX_CONDITION_NUMBER:
            raise ValueError(
                f"The readout error of qubit {q} cannot be mitigated: its confusion matrix {matrix.tolist()} is "
                f"(nearly) singular (condition number {cond:.3g}): the readout says almost nothing about the state."
            )
        out.append(np.linalg.inv(matrix))
    return out


def unmix(probs: np.ndarray, matrices: Matrices) -> np.ndarray:
    """The linear inverse of :func:`apply_readout_error`: ``probs · (R_{N-1}^{-1} ⊗ … ⊗ R_0^{-1})``, qubit by qubit
    (O(N·2^N)). A quasi-probability vector: it keeps the sum but may have negative entries. Linear, so it also
    maps the rows of a Jacobian ``d probs / d θ``."""
    return apply_readout_error(np.asarray(probs, dtype=np.float64), inverse_matrices(matrices))


def project_to_simplex(quasi: np.ndarray, projection: str = "nearest") -> np.ndarray:
    """The probability vector(s) for quasi-probabilities ``quasi[..., 2^N]`` (leading batch dimensions kept).

    ``"nearest"``: the Euclidean projection onto the simplex {p >= 0, Σ p = 1} (Smolin, Gambetta and Smith,
    PRL 108, 070502 (2012), arXiv:1106.5458): p_i = max(q_i - τ, 0) with the one τ that makes the sum 1.
    ``"clip"``: negatives set to 0, then divided by the sum."""
    if projection not in PROJECTIONS:
        raise ValueError(f"projection must be one of {PROJECTIONS}, got {projection!r}.")
    q = np.asarray(quasi, dtype=np.float64)
    if projection == "clip":
        clipped = np.clip(q, 0.0, None)
        total = clipped.sum(axis=-1, keepdims=True)
        if np.any(total <= 0):
            raise ValueError("Every entry is <= 0 after unmixing: there is no probability vector to renormalise.")
        return clipped / total
    # Sort descending; the support is the largest k with u_k - (Σ_{j<=k} u_j - 1) / k > 0 (always k >= 1).
    u = -np.sort(-q, axis=-1)
    css = np.cumsum(u, axis=-1) - 1.0
    k = np.arange(1, q.shape[-1] + 1, dtype=np.float64)
    support = (u - css / k) > 0
    rho = q.shape[-1] - 1 - np.argmax(support[..., ::-1], axis=-1)  # index of the last True
    tau = np.take_along_axis(css, rho[..., None], axis=-1) / (rho[..., None] + 1.0)
    return np.clip(q - tau, 0.0, None)


def mitigate(probs: np.ndarray, matrices: Matrices, projection: str = "nearest") -> np.ndarray:
    """Readout-error-mitigated probabilities: :func:`unmix`, then :func:`project_to_simplex`.

    ``probs[..., 2^N]`` (numpy; leading batch dimensions allowed) in Qiskit's little-endian order; ``matrices[q]``
    the 2x2 confusion matrix ``R[true, measured]`` of logical qubit q (``None``: ideal readout). Exact on exact
    noisy probabilities; on frequencies it removes the readout bias, not the shot noise."""
    return project_to_simplex(unmix(probs, matrices), projection)


# --------------------------------------------------------------------------------------------------
# Where the matrices come from
# --------------------------------------------------------------------------------------------------


def _symmetric(error: float) -> np.ndarray:
    return np.array([[1.0 - error, error], [error, 1.0 - error]], dtype=np.float64)


def readout_matrices_from_target(target, physical_qubits: Sequence[int]) -> list[Optional[np.ndarray]]:
    """Per logical qubit q, the confusion matrix of physical qubit ``physical_qubits[q]`` in a device ``Target``.

    The ``measure`` instruction's error e gives the symmetric matrix [[1 - e, e], [e, 1 - e]] (what IBM devices
    report, and what Aer's ``basic_device_readout_errors`` builds); properties with ``prob_meas1_prep0`` and
    ``prob_meas0_prep1`` give the asymmetric one. No error recorded (or no ``measure``): ``None`` (ideal)."""
    measure = target["measure"] if "measure" in target.operation_names else {}
    out = []
    for p in physical_qubits:
        prop = measure.get((int(p),)) if measure else None
        if prop is None:
            out.append(None)
        elif hasattr(prop, "prob_meas1_prep0") and hasattr(prop, "prob_meas0_prep1"):
            p0m1, p1m0 = float(prop.prob_meas1_prep0), float(prop.prob_meas0_prep1)
            out.append(np.array([[1.0 - p0m1, p0m1], [p1m0, 1.0 - p1m0]], dtype=np.float64))
        elif prop.error is None:
            out.append(None)
        else:
            out.append(_symmetric(float(prop.error)))
    return out


def readout_matrices_from_noise_model(model, physical_qubits: Sequence[int]) -> list[Optional[np.ndarray]]:
    """Per logical qubit, the 2x2 readout matrix R[true, measured] of its physical qubit in a
    ``qiskit_aer.noise.NoiseModel`` (``None`` = ideal).

    Only uncorrelated single-qubit readout errors are tensored matrices: a correlated multi-qubit readout error
    raises a ``ValueError``."""
    default = None
    specific: dict[int, np.ndarray] = {}
    for error in model.to_dict()["errors"]:
        if error["type"] != "roerror":
            continue
        matrix = np.asarray(error["probabilities"], dtype=np.float64)
        if matrix.shape != (2, 2):
            raise ValueError(
                "The noise model has a correlated multi-qubit readout error, which per-qubit confusion matrices "
                "cannot express (neither the exact density-matrix path nor readout mitigation can apply it); use "
                "backend='aer_shots' without readout_mitigation for this noise model."
            )
        if "gate_qubits" not in error:
            default = matrix
        else:
            for (q,) in error["gate_qubits"]:
                specific[int(q)] = matrix
    return [specific.get(int(p), default) for p in physical_qubits]


def readout_matrices(device: Any, physical_qubits: Sequence[int]) -> list[Optional[np.ndarray]]:
    """Per-logical-qubit confusion matrices for ``device``: an offline fake IBM device name (``"fake_kyiv"``; needs
    ``pip install "peft-qpa[ibm]"``), a ``qiskit_aer.noise.NoiseModel``, a ``Target``, or a backend with a ``.target``
    (e.g. a fake device instance, as a sampler runs on). ``physical_qubits[q]`` is the physical qubit logical qubit q
    was measured on (``AerProbabilities.physical_qubits``; the transpiled circuit's ``layout.final_index_layout()``)."""
    if isinstance(device, str):
        from ..noise import load_fake_backend

        return readout_matrices_from_target(load_fake_backend(device).target, physical_qubits)
    from ..noise import is_noise_model

    if is_noise_model(device):
        return readout_matrices_from_noise_model(device, physical_qubits)
    from qiskit.transpiler import Target

    if isinstance(device, Target):
        return readout_matrices_from_target(device, physical_qubits)
    if isinstance(getattr(device, "target", None), Target):
        return readout_matrices_from_target(device.target, physical_qubits)
    raise ValueError(
        "readout_matrices needs a fake IBM device name (e.g. 'fake_kyiv'), a qiskit_aer.noise.NoiseModel, a "
        f"qiskit Target or a backend with a .target; got {type(device).__name__}."
    )
