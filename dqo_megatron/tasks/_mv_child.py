"""Helper process for `math_equiv`: reads {"gold","pred","timeout"} JSON lines, writes {"equal","reason"}.

Runs comparisons in its own main thread, where the signal deadline works; see math_equiv's docstring.
"""

from __future__ import annotations

import json
import sys

from dqo_megatron.tasks.math_equiv import _compare_here


def main() -> None:
    for line in sys.stdin:
        req = json.loads(line)
        res = _compare_here(req["gold"], req["pred"], float(req["timeout"]))
        sys.stdout.write(json.dumps({"equal": res.equal, "reason": res.reason}) + "\n")
        sys.stdout.flush()


if __name__ == "__main__":
    main()
