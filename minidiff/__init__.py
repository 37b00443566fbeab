"""minidiff: diffusion models from first principles, one small module per concept.

Start with ``notebooks/01_forward_process.ipynb``; the lessons in ``lessons/`` derive every
formula that the modules implement.

The kinds of model (declared once, in :mod:`minidiff.contracts`):

* ``EpsModel``        ε_θ(x_t, timesteps) — what every sampler of lessons 03 and 08 takes;
* ``TimeScore``       ∇ log p_s(x) at continuous time s — the SDE and probability-flow solvers (lesson 05);
* ``LevelScore``      ∇ log p(x) of one density — Langevin dynamics and the score-matching losses (lesson 04);
* ``SigmaScore``      the score at noise level σ — annealed Langevin (lesson 04);
* ``VelocityModel``   v_θ(x_τ, τ) on a straight probability path — flow matching (lesson 14);
* ``NoisyClassifier`` logits of p(y | x_t) — classifier guidance (lesson 09).

Their adapters: ``score_from_eps`` (ε → TimeScore), ``eps_from_score`` (TimeScore → ε), ``at_level``
(TimeScore → LevelScore), ``eps_from_velocity`` (velocity → ε), and the pointwise conversions
``NoiseSchedule.score_from_eps`` / ``eps_from_score`` / ``x0_from_eps`` / ``v_from_eps``. Conditioning is a
wrapper that returns a plain model of the same kind (:mod:`minidiff.guidance`, :func:`minidiff.samplers.thresholded`),
so samplers never learn about labels or captions. Exact models of toy data live in :mod:`minidiff.oracles`.
"""

from minidiff.runtime import budget, device, is_fast, seed_everything
from minidiff.weights import pretrained

__all__ = ["budget", "device", "is_fast", "pretrained", "seed_everything"]
__version__ = "0.1.0"
