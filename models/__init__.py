"""Model code: loading, tokenizing and forward passes. Imports no Ray, so it is unit-testable."""
