"""Running the service: the ``recbalance`` command line, the local launcher, what each rank
runs, the checks made before any rank starts, process groups and devices, and the
allocator setting of training processes."""
