"""The embedded toy world: procedural shapes, a tiny real Stable Diffusion pipeline, a
hackable reward and prior-fidelity metrics, so the whole loop runs on a laptop CPU."""
