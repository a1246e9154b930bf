// Package leancheck holds a test that keeps the library's light path light:
// a program that imports only provider/local, envelope and legacy must not
// compile a cloud SDK, a database driver or a container library.
package leancheck
