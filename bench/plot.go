package bench

import (
	"fmt"
	"math"
	"strings"
)

// palette gives each contender a colour, in order of appearance.
var palette = []string{"#222222", "#d62728", "#1f77b4", "#ff7f0e", "#2ca02c", "#9467bd", "#8c564b"}

// SVG plots throughput (MB/s, log scale) against payload size (log scale)
// for encrypt and decrypt side by side, one line per contender.
func SVG(rs []Result) string {
	const (
		panelW, panelH = 380, 300
		left, top      = 80, 50
		gap            = 85
		legendH        = 20
	)
	ss := sizes(rs)
	ns := names(rs)
	if len(ss) == 0 {
		return ""
	}
	lo, hi := math.Inf(1), math.Inf(-1)
	for _, r := range rs {
		lo, hi = math.Min(lo, r.MBps()), math.Max(hi, r.MBps())
	}
	ylo, yhi := math.Floor(math.Log10(lo)), math.Ceil(math.Log10(hi))
	if yhi == ylo {
		yhi++
	}
	xlo, xhi := math.Log2(float64(ss[0])), math.Log2(float64(ss[len(ss)-1]))
	if xhi == xlo {
		xhi++
	}
	W := left + 2*panelW + gap + 30
	H := top + panelH + 50 + legendH*((len(ns)+2)/3)
	var b strings.Builder
	fmt.Fprintf(&b, `<svg xmlns="http://www.w3.org/2000/svg" width="%d" height="%d" viewBox="0 0 %d %d" font-family="sans-serif" font-size="12">`+"\n", W, H, W, H)
	fmt.Fprintf(&b, `<rect width="%d" height="%d" fill="white"/>`+"\n", W, H)
	fmt.Fprintf(&b, `<text x="%d" y="22" font-size="15" font-weight="bold">Throughput against payload size (MB/s, log scales; higher is faster)</text>`+"\n", left)
	for pi, op := range []Op{Encrypt, Decrypt} {
		x0 := float64(left + pi*(panelW+gap))
		y0 := float64(top)
		px := func(size int) float64 { return x0 + (math.Log2(float64(size))-xlo)/(xhi-xlo)*panelW }
		py := func(v float64) float64 { return y0 + panelH - (math.Log10(v)-ylo)/(yhi-ylo)*panelH }
		fmt.Fprintf(&b, `<text x="%.0f" y="%.0f" font-weight="bold">%s</text>`+"\n", x0+panelW/2-25, y0-8, op)
		fmt.Fprintf(&b, `<rect x="%.0f" y="%.0f" width="%d" height="%d" fill="none" stroke="#999"/>`+"\n", x0, y0, panelW, panelH)
		for e := ylo; e <= yhi; e++ {
			y := py(math.Pow(10, e))
			fmt.Fprintf(&b, `<line x1="%.0f" y1="%.1f" x2="%.0f" y2="%.1f" stroke="#ddd"/>`+"\n", x0, y, x0+panelW, y)
			fmt.Fprintf(&b, `<text x="%.0f" y="%.1f" text-anchor="end">%s</text>`+"\n", x0-6, y+4, fmtPow10(e))
		}
		for _, s := range ss {
			x := px(s)
			fmt.Fprintf(&b, `<line x1="%.1f" y1="%.0f" x2="%.1f" y2="%.0f" stroke="#ddd"/>`+"\n", x, y0, x, y0+panelH)
			fmt.Fprintf(&b, `<text x="%.1f" y="%.0f" text-anchor="middle">%s</text>`+"\n", x, y0+panelH+18, SizeName(s))
		}
		for ci, n := range ns {
			var pts []string
			for _, s := range ss {
				if r, ok := Find(rs, n, op, s); ok {
					pts = append(pts, fmt.Sprintf("%.1f,%.1f", px(s), py(r.MBps())))
				}
			}
			col := palette[ci%len(palette)]
			dash := ""
			if n == NameRaw {
				dash = ` stroke-dasharray="6,4"`
			}
			fmt.Fprintf(&b, `<polyline points="%s" fill="none" stroke="%s" stroke-width="2"%s/>`+"\n", strings.Join(pts, " "), col, dash)
			for _, p := range pts {
				xy := strings.Split(p, ",")
				fmt.Fprintf(&b, `<circle cx="%s" cy="%s" r="3" fill="%s"/>`+"\n", xy[0], xy[1], col)
			}
		}
	}
	ly := top + panelH + 45
	for ci, n := range ns {
		x := left + (ci%3)*260
		y := ly + (ci/3)*22
		col := palette[ci%len(palette)]
		fmt.Fprintf(&b, `<line x1="%d" y1="%d" x2="%d" y2="%d" stroke="%s" stroke-width="3"/>`, x, y-4, x+24, y-4, col)
		fmt.Fprintf(&b, `<text x="%d" y="%d">%s</text>`+"\n", x+30, y, xmlEscape(n))
	}
	b.WriteString("</svg>\n")
	return b.String()
}

func fmtPow10(e float64) string {
	v := math.Pow(10, e)
	switch {
	case v >= 1e3:
		return fmt.Sprintf("%.0f GB/s", v/1e3)
	case v >= 1:
		return fmt.Sprintf("%.0f MB/s", v)
	}
	return fmt.Sprintf("%g MB/s", v)
}

func xmlEscape(s string) string {
	return strings.NewReplacer("&", "&amp;", "<", "&lt;", ">", "&gt;").Replace(s)
}
