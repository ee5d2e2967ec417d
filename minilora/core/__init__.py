"""The ground floor: errors, checks of numbers and tensors, files written whole, outputs claimed
and locked, threads. Imports nothing else of minilora."""
