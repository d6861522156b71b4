fn main() { println!("{}", lb_userspace::EBPF_OBJ.len()); }
