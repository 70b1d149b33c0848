"""Seeds: their ranges, what 0 means, and how one seed is derived from another, written once.

**0 means "derive it / choose for me", everywhere.** A seed of 0 is never drawn
from as such:

* the gateway's CreateVideo: 0 chooses a job seed (:func:`choose_seed`), recorded
  in the job;
* the gateway's RegenerateScene: 0 clears the scene's own seed, so the scene goes
  back to the seed derived from the job seed;
* the diffusion service's scene seed: 0 derives the scene's seed from the job seed
  and the scene index (:func:`scene_seed`), and under seed lock a scene with
  characters and no seed of its own is drawn from its first character's seed; a
  non-zero scene seed is the scene's own and is drawn from as given, lock or not.
  A character's seed 0 derives one from the job seed and the name. (A request
  with no job seed at all keeps a scene seed of 0 as it is: nothing to derive from.)
* the LLM service's seed: 0 chooses one for the request.

Ranges: a client of the public API sends seeds from 0 to :data:`MAX_SEED`
(2^63-1), so a seed fits a signed 64-bit integer in every language and database.
The internal contracts carry ``uint64`` and accept 0 to :data:`MAX_UINT64_SEED`.
Derived seeds are 63-bit, so they fit both.
"""

from __future__ import annotations

import hashlib
import secrets

#: Largest seed a client of the public API may send (CreateVideo, RegenerateScene): 2^63-1.
MAX_SEED = 2**63 - 1
#: Largest seed the internal contracts (uint64 fields) accept: 2^64-1.
MAX_UINT64_SEED = 2**64 - 1


def derive_seed(root: int, *parts: object) -> int:
    """A 63-bit seed from ``root`` and ``parts``: stable across runs, machines and versions.

    The blake2b digest (8 bytes) of ``"root:part:part..."``, shifted right by one bit
    so it fits a signed 64-bit generator seed.
    """
    text = ":".join(str(part) for part in (root, *parts))
    digest = hashlib.blake2b(text.encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") >> 1


def scene_seed(job_seed: int, index: int) -> int:
    """Seed of scene ``index`` (1-based) of a job: derived from the job seed, so a job
    re-renders identically. What a scene seed of 0 stands for in a render request."""
    return derive_seed(job_seed, index)


def choose_seed(max_seed: int = MAX_SEED) -> int:
    """A random seed from 1 to ``max_seed``: what a seed of 0 asks for where one is chosen."""
    return secrets.randbelow(max_seed) + 1
