"""RULER-style synthetic long-context tasks, generated offline and deterministically.

Each task hides short, exactly checkable facts in a haystack and asks for them back:

- needle retrieval (``niah_single``, ``niah_multikey``, ``niah_multivalue``,
  ``niah_multiquery``): key/number facts among filler sentences or natural text;
- multi-hop tracing (``vt``): chains of variable assignments, answer every name that
  ends up holding the queried value;
- aggregation (``cwe``, ``fwe``): find the most common words of a list or coded text.

The haystack is grown or shrunk until the whole prompt (context + question) is as long
as possible without exceeding the target length, measured in the caller's tokens; it
lands within one haystack unit (a word, or a list entry) of the target.

Every random choice comes from a `random.Random` seeded by a string built from
(seed, task, target length, sample index): string seeds are hashed with SHA-512 by
`random`, so samples are identical across processes and platforms, independent of
PYTHONHASHSEED.

A sample's `context` holds the instructions and the haystack and its `question` the
query and an answer prefix, so a caller can prefill and compress the context before
the question arrives; ``sample.prompt == sample.context + sample.question``.

Modules: `plan` (the contract between a task and the length search), `vocab` (random
needle values, keys and words), `haystack` (filler text and needle placement), `tasks`
(the task generators and their registry), `fit` (the length search) and `generate`
(samples).
"""

from kvcompress.eval.ruler.generate import Sample, generate_sample, generate_tasks
from kvcompress.eval.ruler.plan import RulerConfig, TaskSpec
from kvcompress.eval.ruler.tasks import TASKS

__all__ = [
    "TASKS",
    "RulerConfig",
    "Sample",
    "TaskSpec",
    "generate_sample",
    "generate_tasks",
]
