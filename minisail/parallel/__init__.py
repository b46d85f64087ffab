"""Running one model over several processes (torch.distributed, launched by torchrun): tensor parallel
(tensor.py: the split modules; plan.py: which slices each rank reads), data parallel (data.py), and joining the
process group (launch.py)."""
