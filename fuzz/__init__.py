"""Coverage-guided fuzzing of the relay's parsers with atheris (libFuzzer).

Each target is a module ``fuzz.<target>`` with a ``fuzz_one_input(data)``
function that atheris calls with mutated bytes; run one with
``python -m fuzz --target NAME --seconds N`` (see fuzz/README.md). The seed
corpora under ``fuzz/corpus/<target>/`` are written by ``python -m
fuzz.make_corpus``. Nothing here is imported by the product.
"""

from __future__ import annotations

from typing import Final

#: The targets, by module name under ``fuzz``.
TARGETS: Final = ("tunnel_frame", "ws_frames", "csr_intake")
