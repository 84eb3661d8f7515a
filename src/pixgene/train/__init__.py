"""The training layer: encoding training tiles into a cache, the Lightning plan, the member loop and the
resumable stores (member checkpoints, feature cache). Imports torch and Lightning."""
