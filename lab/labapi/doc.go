// Package labapi is the contract of the lab's HTTP endpoints
// (/cbtflow-lab/v1): their request and answer types, their errors, and a
// Client of them.
//
// It is apart from lab, which serves these endpoints, because the
// worker's lab disk source needs the client (to find a snapshot's frozen
// image and the fault filters to put in front of it) but must not link
// govmomi's simulator: the production worker never runs a lab. This
// package imports no simulator, and the worker's test fails if the
// simulator shows up among its dependencies again.
//
// It is not for talking to a vCenter (internal/vsphere does that), and it
// holds no lab behaviour: what the endpoints do is lab's.
package labapi
