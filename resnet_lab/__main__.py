"""`python -m resnet_lab [overrides]`: Hydra's command line, with one-line errors."""

import os
import sys

from resnet_lab.errors import describe


def main() -> None:
    full_error = os.environ.get("HYDRA_FULL_ERROR") == "1"
    # Hydra prints its errors over several lines; letting them propagate lets us print one.
    os.environ["HYDRA_FULL_ERROR"] = "1"
    from resnet_lab.train import run

    try:
        run()
    except KeyboardInterrupt:
        print("error: interrupted; the run folder's checkpoints/last.pt, if any, holds the last "
              "checkpoint written", file=sys.stderr)
        sys.exit(130)
    except Exception as e:  # noqa: BLE001
        message = describe(e)
        if message is None or full_error:
            raise
        print(f"error: {message}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
