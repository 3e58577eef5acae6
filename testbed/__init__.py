"""The test bed: real etcd, kube-apiserver, controller-manager, scheduler, KWOK, MinIO, helm
and kubectl, provisioned once per machine and started on loopback for tests and the demo."""
