"""`python -m uptrain …` — so `accelerate launch -m uptrain train recipe.yaml` works."""
from uptrain.cli import main

if __name__ == "__main__":
    raise SystemExit(main())
