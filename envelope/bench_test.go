//go:build unix

package envelope

import (
	"context"
	"crypto/aes"
	"crypto/cipher"
	"syscall"
	"testing"
	"time"
)

// cpuTimer reports the process's CPU time per op as "cpu-ns/op" beside the
// wall-clock ns/op: on a shared machine the wall clock includes time spent
// waiting for a core, CPU time does not. Call it just before the loop and
// the returned function just after.
func cpuTimer(b *testing.B) func() {
	start := cpuTime(b)
	return func() {
		b.ReportMetric(float64((cpuTime(b)-start).Nanoseconds())/float64(b.N), "cpu-ns/op")
	}
}

func cpuTime(b *testing.B) time.Duration {
	var ru syscall.Rusage
	if err := syscall.Getrusage(syscall.RUSAGE_SELF, &ru); err != nil {
		b.Fatal(err)
	}
	return time.Duration(ru.Utime.Nano() + ru.Stime.Nano())
}

var benchSizes = []struct {
	name string
	n    int
}{{"256B", 256}, {"1KiB", 1024}, {"16KiB", 16384}}

var benchAAD = []byte("project-0001/STRIPE_SECRET_KEY")

// rawGCM is the baseline: crypto/cipher AES-256-GCM with nothing around it.
func rawGCM(b *testing.B) cipher.AEAD {
	block, err := aes.NewCipher(make([]byte, 32))
	if err != nil {
		b.Fatal(err)
	}
	a, err := cipher.NewGCM(block)
	if err != nil {
		b.Fatal(err)
	}
	return a
}

// benchEnvelope returns an Envelope whose DEK is made and cached, and a
// function that reports provider calls per op and fails if there were any.
func benchEnvelope(b *testing.B) (*Envelope, func()) {
	kek := &countingKEK{KEKProvider: newKEK(b, "bench")}
	e := newTestEnvelope(b, kek)
	blob := mustEncrypt(b, e, []byte("warm"), benchAAD)
	if _, err := e.Decrypt(context.Background(), blob, benchAAD); err != nil {
		b.Fatal(err)
	}
	before := kek.wraps.Load() + kek.unwraps.Load()
	return e, func() {
		calls := kek.wraps.Load() + kek.unwraps.Load() - before
		b.ReportMetric(float64(calls)/float64(b.N), "provider-calls/op")
		if calls != 0 {
			b.Fatalf("%d provider calls with a cached DEK", calls)
		}
	}
}

// BenchmarkEncrypt compares Envelope.Encrypt (random nonce, header, aad
// framing, budget) and SealWithKeyID with a bare AES-256-GCM Seal of the
// same payload, sub-benchmarks side by side per size.
func BenchmarkEncrypt(b *testing.B) {
	ctx := context.Background()
	for _, s := range benchSizes {
		pt := make([]byte, s.n)
		b.Run(s.name+"/envelope", func(b *testing.B) {
			e, report := benchEnvelope(b)
			b.SetBytes(int64(s.n))
			b.ReportAllocs()
			cpu := cpuTimer(b)
			for b.Loop() {
				if _, err := e.Encrypt(ctx, pt, benchAAD); err != nil {
					b.Fatal(err)
				}
			}
			cpu()
			report()
		})
		b.Run(s.name+"/keyid", func(b *testing.B) {
			k, _, err := NewDataKey(ctx, newKEK(b, "bench"), nil, WithMaxMessages(MaxMessagesLimit))
			if err != nil {
				b.Fatal(err)
			}
			b.SetBytes(int64(s.n))
			b.ReportAllocs()
			cpu := cpuTimer(b)
			for b.Loop() {
				if _, err := SealWithKeyID(k, []byte("dek-0001"), pt, benchAAD); err != nil {
					b.Fatal(err)
				}
			}
			cpu()
		})
		b.Run(s.name+"/raw", func(b *testing.B) {
			a := rawGCM(b)
			nonce := make([]byte, NonceSize)
			b.SetBytes(int64(s.n))
			b.ReportAllocs()
			cpu := cpuTimer(b)
			for b.Loop() {
				a.Seal(nil, nonce, pt, benchAAD)
			}
			cpu()
		})
	}
}

// BenchmarkDecrypt compares Envelope.Decrypt with its DEK cached against a
// bare AES-256-GCM Open.
func BenchmarkDecrypt(b *testing.B) {
	ctx := context.Background()
	for _, s := range benchSizes {
		pt := make([]byte, s.n)
		b.Run(s.name+"/envelope", func(b *testing.B) {
			e, report := benchEnvelope(b)
			blob := mustEncrypt(b, e, pt, benchAAD)
			b.SetBytes(int64(s.n))
			b.ReportAllocs()
			cpu := cpuTimer(b)
			for b.Loop() {
				if _, err := e.Decrypt(ctx, blob, benchAAD); err != nil {
					b.Fatal(err)
				}
			}
			cpu()
			report()
		})
		b.Run(s.name+"/raw", func(b *testing.B) {
			a := rawGCM(b)
			nonce := make([]byte, NonceSize)
			ct := a.Seal(nil, nonce, pt, benchAAD)
			b.SetBytes(int64(s.n))
			b.ReportAllocs()
			cpu := cpuTimer(b)
			for b.Loop() {
				if _, err := a.Open(nil, nonce, ct, benchAAD); err != nil {
					b.Fatal(err)
				}
			}
			cpu()
		})
	}
}

// BenchmarkParallel runs 1 KiB encrypt+decrypt on one shared Envelope from
// every P, beside the same on one shared raw AEAD: the envelope should
// scale as the raw cipher does.
func BenchmarkParallel(b *testing.B) {
	ctx := context.Background()
	pt := make([]byte, 1024)
	b.Run("1KiB/envelope", func(b *testing.B) {
		e, report := benchEnvelope(b)
		b.SetBytes(2 * 1024)
		b.ReportAllocs()
		cpu := cpuTimer(b)
		b.RunParallel(func(pb *testing.PB) {
			for pb.Next() {
				blob, err := e.Encrypt(ctx, pt, benchAAD)
				if err != nil {
					b.Error(err)
					return
				}
				if _, err := e.Decrypt(ctx, blob, benchAAD); err != nil {
					b.Error(err)
					return
				}
			}
		})
		cpu()
		report()
	})
	b.Run("1KiB/raw", func(b *testing.B) {
		a := rawGCM(b)
		b.SetBytes(2 * 1024)
		b.ReportAllocs()
		cpu := cpuTimer(b)
		b.RunParallel(func(pb *testing.PB) {
			nonce := make([]byte, NonceSize)
			for pb.Next() {
				ct := a.Seal(nil, nonce, pt, benchAAD)
				if _, err := a.Open(nil, nonce, ct, benchAAD); err != nil {
					b.Error(err)
					return
				}
			}
		})
		cpu()
	})
}
