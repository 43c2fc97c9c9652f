"""Evaluation: exact AR likelihoods, masked-diffusion ELBO / conditional likelihood estimates, model comparison."""
