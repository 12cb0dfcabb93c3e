module github.com/cbtflow/cbtflow

go 1.26

require github.com/vmware/govmomi v0.56.0 // indirect
