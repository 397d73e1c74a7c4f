"""Where a run's teacher comes from, behind one interface (`sources.TeacherSource`): resident, streamed or cached.

- `sources`: `open_teacher`, the `TeacherSource`s, and building a run's missing caches.
- `streamed`: a teacher run from disk layer group by layer group.
- `cache`: the offline cache of a teacher's outputs and `cache_rows`, the program that builds it.
- `fingerprint`: what a cache's rows were computed from, so a cache is never read for another run.

Imports `models`, `distill`, `vishwam.errors`, `vishwam.sharding`, `vishwam.io`, `vishwam.config` and
`vishwam.data`.
"""
