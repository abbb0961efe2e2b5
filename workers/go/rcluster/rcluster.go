// Package rcluster makes a Go server an rcluster-lb worker in every mode, with the standard
// library only. Go programs make system calls directly, so the preload shim cannot reach them;
// this package speaks the worker contract of docs/PROTOCOL.md instead:
//
//   - reuseport/shared mode: fd 3+i is a real listening socket; Listeners returns it as a
//     net.Listener (net.FileListener).
//   - dispatch mode: fd 3+i is a SOCK_SEQPACKET channel; Listeners returns a net.Listener whose
//     Accept receives one CONN message and its connection fd (SCM_RIGHTS), sends READY on the
//     first Accept, reports every closed connection with CLOSED, and STOPPING on Close.
//
// Readiness in the kernel modes: call Ready after the server is set up (sd_notify READY=1 on
// NOTIFY_SOCKET).
package rcluster

import (
	"encoding/binary"
	"errors"
	"fmt"
	"net"
	"os"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
)

const (
	headerLen  = 16
	kindConn   = 1
	kindReady  = 2
	kindClosed = 3
	kindStop   = 5
)

func encode(kind byte, value uint64) []byte {
	m := make([]byte, headerLen)
	m[0], m[1], m[2], m[3] = 'R', 'C', 1, kind
	binary.LittleEndian.PutUint64(m[8:], value)
	return m
}

func decode(m []byte) (kind byte, ok bool) {
	if len(m) != headerLen || m[0] != 'R' || m[1] != 'C' || m[2] != 1 ||
		binary.LittleEndian.Uint32(m[4:8]) != 0 {
		return 0, false
	}
	return m[3], true
}

// Listeners returns one net.Listener per inherited fd (LISTEN_FDS, for this pid), in
// RCLUSTER_LISTEN order. An error if the process was not started as a worker.
func Listeners() ([]net.Listener, error) {
	n, err := strconv.Atoi(os.Getenv("LISTEN_FDS"))
	if err != nil || n <= 0 {
		return nil, errors.New("LISTEN_FDS is not set: not started by rcluster-lb")
	}
	if pid, err := strconv.Atoi(os.Getenv("LISTEN_PID")); err != nil || pid != os.Getpid() {
		return nil, errors.New("LISTEN_PID is not this process")
	}
	addrs := strings.Split(os.Getenv("RCLUSTER_LISTEN"), ",")
	mode := os.Getenv("RCLUSTER_MODE")
	var out []net.Listener
	for i := 0; i < n; i++ {
		fd := 3 + i
		syscall.CloseOnExec(fd)
		if mode != "dispatch" {
			f := os.NewFile(uintptr(fd), fmt.Sprintf("listener%d", i))
			l, err := net.FileListener(f) // a duplicate; the original is closed below
			f.Close()
			if err != nil {
				return nil, fmt.Errorf("fd %d: %w", fd, err)
			}
			out = append(out, l)
			continue
		}
		if err := syscall.SetNonblock(fd, true); err != nil {
			return nil, fmt.Errorf("fd %d: %w", fd, err)
		}
		// A non-blocking fd goes to Go's network poller: Accept parks the goroutine, not a thread.
		pf := os.NewFile(uintptr(fd), fmt.Sprintf("channel%d", i))
		rc, err := pf.SyscallConn()
		if err != nil {
			return nil, err
		}
		var addr net.Addr = &net.TCPAddr{}
		if i < len(addrs) {
			if a, err := net.ResolveTCPAddr("tcp", addrs[i]); err == nil {
				addr = a
			}
		}
		out = append(out, &channel{file: pf, rc: rc, addr: addr})
	}
	return out, nil
}

// Ready tells the master the worker is ready (sd_notify READY=1); needed in the kernel modes,
// harmless in dispatch mode.
func Ready() {
	name := os.Getenv("NOTIFY_SOCKET")
	if name == "" {
		return
	}
	// A leading '@' names an abstract socket; Go's net package maps it to the NUL byte itself.
	c, err := net.DialUnix("unixgram", nil, &net.UnixAddr{Name: name, Net: "unixgram"})
	if err != nil {
		return
	}
	defer c.Close()
	c.Write([]byte("READY=1"))
}

// channel is a dispatch channel as a net.Listener.
type channel struct {
	file    *os.File
	rc      syscall.RawConn
	addr    net.Addr
	ready   sync.Once
	pending uint64 // closes not yet reported (the channel was full)
	closed  int32
}

// send writes one message without blocking; false if the channel is full or gone.
func (c *channel) send(kind byte, value uint64) bool {
	sent := false
	c.rc.Write(func(fd uintptr) bool {
		_, err := syscall.SendmsgN(int(fd), encode(kind, value), nil, nil, syscall.MSG_DONTWAIT|syscall.MSG_NOSIGNAL)
		sent = err == nil
		return true
	})
	return sent
}

// flush reports pending closes; on failure they stay pending for the next try.
func (c *channel) flush() {
	if n := atomic.SwapUint64(&c.pending, 0); n > 0 && !c.send(kindClosed, n) {
		atomic.AddUint64(&c.pending, n)
	}
}

func (c *channel) Accept() (net.Conn, error) {
	c.ready.Do(func() { c.send(kindReady, 0) })
	for {
		c.flush()
		buf := make([]byte, 2*headerLen)
		oob := make([]byte, syscall.CmsgSpace(16*4))
		var n, oobn int
		var rerr error
		err := c.rc.Read(func(fd uintptr) bool {
			n, oobn, _, _, rerr = syscall.Recvmsg(int(fd), buf, oob, syscall.MSG_CMSG_CLOEXEC)
			return rerr != syscall.EAGAIN
		})
		if err == nil {
			err = rerr
		}
		if err != nil {
			if atomic.LoadInt32(&c.closed) != 0 {
				return nil, net.ErrClosed
			}
			return nil, err
		}
		var fds []int
		if msgs, err := syscall.ParseSocketControlMessage(oob[:oobn]); err == nil {
			for _, m := range msgs {
				if got, err := syscall.ParseUnixRights(&m); err == nil {
					fds = append(fds, got...)
				}
			}
		}
		if n == 0 && len(fds) == 0 {
			return nil, errors.New("rcluster: the master closed the dispatch channel")
		}
		kind, ok := decode(buf[:n])
		if !ok || kind != kindConn || len(fds) == 0 {
			for _, fd := range fds {
				syscall.Close(fd)
			}
			if ok && kind == kindConn { // a CONN without its fd: balance the master's count
				atomic.AddUint64(&c.pending, 1)
			}
			continue
		}
		for _, extra := range fds[1:] {
			syscall.Close(extra)
			atomic.AddUint64(&c.pending, 1)
		}
		f := os.NewFile(uintptr(fds[0]), "conn")
		conn, err := net.FileConn(f) // duplicates the fd
		f.Close()
		if err != nil {
			atomic.AddUint64(&c.pending, 1)
			continue
		}
		return &tracked{Conn: conn, ch: c}, nil
	}
}

// Close stops this listener: STOPPING to the master, then the channel is closed.
func (c *channel) Close() error {
	if !atomic.CompareAndSwapInt32(&c.closed, 0, 1) {
		return nil
	}
	c.flush()
	c.send(kindStop, 0)
	return c.file.Close()
}

func (c *channel) Addr() net.Addr { return c.addr }

// tracked reports its close to the master exactly once.
type tracked struct {
	net.Conn
	ch   *channel
	once sync.Once
}

func (t *tracked) Close() error {
	err := t.Conn.Close()
	t.once.Do(func() {
		atomic.AddUint64(&t.ch.pending, 1)
		if atomic.LoadInt32(&t.ch.closed) == 0 {
			t.ch.flush()
		}
	})
	return err
}
