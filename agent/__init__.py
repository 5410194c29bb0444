"""Device side of prune-pack. Never imports torch, ultralytics, or anything from deploy/ or pruning/."""
