"""Inversion methods: what each one trains and how its artifact is saved."""
